"""What the engine reports about itself (TUI monitor, `pie-local ps`)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

WINDOW_S = 10.0  # tokens/s and batch sizes are measured over this recent window


@dataclass
class InferletStats:
    id: int
    name: str
    state: str  # queued | running | done | failed | cancelled
    tokens: int  # tokens this inferlet sent through the model
    pages: int  # KV pages its contexts hold
    elapsed_s: float
    started_at: float | None


@dataclass
class EngineStats:
    model: str
    inferlets: list[InferletStats] = field(default_factory=list)
    pages_total: int = 0
    pages_used: int = 0  # referenced by some context
    pages_shared: int = 0  # referenced by more than one context
    pages_cached: int = 0  # unreferenced but kept for prefix hits (reclaimable)
    pages_free: int = 0  # allocatable (never used + cached)
    tokens_per_s: float = 0.0  # forwarded tokens per second over the last WINDOW_S
    batches: int = 0
    tokens_total: int = 0
    mean_batch_tokens: float = 0.0  # over the last WINDOW_S
    mean_batch_requests: float = 0.0
    max_batch_requests: int = 0
    prefix_hit_rate: float = 0.0  # prompt tokens served from the prefix cache / prompt tokens asked
    queued_requests: int = 0
    drafted_tokens: int = 0  # speculative decoding: tokens drafters proposed, all generations
    accepted_tokens: int = 0  # of those, tokens verification kept
    stall: str | None = None  # the last time an inferlet blocked the event loop: who, where, how long


class Counters:
    """Running totals the scheduler and contexts update."""

    def __init__(self) -> None:
        self.batches = 0
        self.tokens = 0
        self.max_batch_requests = 0
        self.prompt_tokens = 0  # tokens contexts asked to have in KV
        self.prefix_hit_tokens = 0  # of those, tokens adopted from the prefix cache
        self.drafted_tokens = 0
        self.accepted_tokens = 0
        self._recent: deque[tuple[float, int, int]] = deque()  # (time, tokens, requests)

    def record_batch(self, n_tokens: int, n_requests: int, elapsed_s: float) -> None:
        now = time.monotonic()
        self.batches += 1
        self.tokens += n_tokens
        self.max_batch_requests = max(self.max_batch_requests, n_requests)
        self._recent.append((now, n_tokens, n_requests))
        self._trim(now)

    def record_prefix(self, asked: int, hit: int) -> None:
        self.prompt_tokens += asked
        self.prefix_hit_tokens += hit

    def record_speculation(self, drafted: int, accepted: int) -> None:
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted

    def _trim(self, now: float) -> None:
        while self._recent and now - self._recent[0][0] > WINDOW_S:
            self._recent.popleft()

    def fill(self, stats: EngineStats) -> EngineStats:
        now = time.monotonic()
        self._trim(now)
        recent = list(self._recent)
        stats.batches, stats.tokens_total = self.batches, self.tokens
        stats.max_batch_requests = self.max_batch_requests
        stats.drafted_tokens, stats.accepted_tokens = self.drafted_tokens, self.accepted_tokens
        if recent:
            span = max(now - recent[0][0], 1e-3)
            stats.tokens_per_s = sum(t for _, t, _ in recent) / span
            stats.mean_batch_tokens = sum(t for _, t, _ in recent) / len(recent)
            stats.mean_batch_requests = sum(r for _, _, r in recent) / len(recent)
        if self.prompt_tokens:
            stats.prefix_hit_rate = self.prefix_hit_tokens / self.prompt_tokens
        return stats
