"""Sampling parameters and the stop logic of a generation (EOS tokens, stop strings, max tokens)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from pie_local.driver.types import SamplerParams


@dataclass(frozen=True)
class SamplingParams:
    """How one token is drawn. temperature 0 is greedy; filters apply in order top_k, top_p, min_p.

    ``seed`` makes a sampled generation reproducible (step i of a generation uses ``seed + i``);
    None draws a fresh seed per generation.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    @classmethod
    def greedy(cls) -> SamplingParams:
        return cls()

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0.0

    def with_seed(self, seed: int) -> SamplingParams:
        return replace(self, seed=seed)

    def to_driver(self, step: int = 0) -> SamplerParams:
        """The driver's sampler for generation step ``step``."""
        seed = ((self.seed or 0) + step) & 0xFFFFFFFFFFFFFFFF
        return SamplerParams(self.temperature, self.top_k, self.top_p, self.min_p, seed)


class StopChecker:
    """Feeds generated text through stop strings, holding back what may be the start of one.

    ``push(text)`` returns the text that is safe to show now; once a stop string is complete,
    ``stopped`` is True and everything from the stop string on is dropped. ``finish()`` returns
    what was held back when generation ends for another reason.
    """

    def __init__(self, stop: list[str] | tuple[str, ...] = ()) -> None:
        self.stop = [s for s in stop if s]
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        buf = self._held + text
        first = None
        for s in self.stop:
            i = buf.find(s)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, s)
        if first is not None:
            self.stopped, self.matched, self._held = True, first[1], ""
            return buf[: first[0]]
        keep = 0  # longest suffix of buf that is a proper prefix of some stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def finish(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held
