"""Speculative decoding as part of `generate()`: a drafter proposes the next tokens, one forward
pass verifies them all, and the standard rule decides how many to keep.

A drafter is any object with ``async propose(tokens, k) -> list[int] | Draft`` (or a plain
function): ``tokens`` is the context so far, ``k`` the most tokens worth proposing. Given here:
`NgramDrafter` (prompt lookup: what followed the latest earlier occurrence of the context's last
n-gram), `ModelDrafter` (a second, smaller model in its own Engine) and `GuessDrafter` (the
program's own guess of what comes next).

Verification: the pass computes the pending token and the k drafted ones with a sampled row at
each, so row i gives the target's distribution after draft token i. Greedy decoding keeps the
longest prefix of the draft the model agrees with, plus the model's own next token: exactly what
greedy decoding alone would produce. Sampling uses the rule of Leviathan et al. / Chen et al.:
draft token x is kept with probability min(1, p(x) / q(x)) (p the target's distribution after the
sampler's temperature/top-k/top-p/min-p, q the drafter's; a deterministic drafter's q is a point
mass, so x is kept with probability p(x)), and at the first rejection the next token is drawn
from max(0, p - q), renormalised. The output is distributed as sampling without a drafter.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np

from pie_local.runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from pie_local.runtime.engine import Engine


@dataclass
class Draft:
    """Proposed tokens, with the drafter's distribution at each (rows of ``probs``, float
    [len(tokens), n_vocab]) when it sampled them; None: deterministic (point masses)."""

    tokens: list[int]
    probs: np.ndarray | None = None


class Drafter(Protocol):
    async def propose(self, tokens: list[int], k: int) -> list[int] | Draft: ...


# ---- drafters ------------------------------------------------------------------------------------

def find_draft(tokens: Sequence[int], max_ngram: int, max_draft: int) -> list[int]:
    """Tokens that followed the latest earlier occurrence of the longest matching suffix n-gram."""
    tokens = list(tokens)
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + max_draft]
    return []


class NgramDrafter:
    """Prompt lookup: drafts come from the text itself (code edits, quotes, summaries, RAG)."""

    def __init__(self, ngram: int = 3) -> None:
        if ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {ngram}")
        self.ngram = ngram

    async def propose(self, tokens: list[int], k: int) -> list[int]:
        return find_draft(tokens, self.ngram, k)


class GuessDrafter:
    """The program's own guess of the output (a template, the previous answer, a likely phrase):
    proposes the rest of ``guess`` while the output follows it, nothing once it departs."""

    def __init__(self, guess: Sequence[int]) -> None:
        self.guess = [int(t) for t in guess]
        self._start: int | None = None  # context length at the first proposal: where the output began

    async def propose(self, tokens: list[int], k: int) -> list[int]:
        if self._start is None:
            self._start = len(tokens) - 1  # the last context token is the first pass's input
        out = tokens[self._start + 1:]
        if out != self.guess[: len(out)]:
            return []
        return self.guess[len(out): len(out) + k]


class ModelDrafter:
    """A second model, in its own `Engine` on the same event loop (it must share the target's
    vocabulary), drafts greedily. Its context follows the target's tokens: the common prefix is
    kept, the rest filled, so each proposal computes only what changed. ``release()`` it after."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._ctx: Any = None

    async def propose(self, tokens: list[int], k: int) -> list[int]:
        if self._ctx is None:
            self._ctx = self.engine.context()
        ctx = self._ctx
        have = ctx.token_ids
        n = 0
        while n < min(len(have), len(tokens)) and have[n] == tokens[n]:
            n += 1
        if n < len(have):
            ctx.truncate(n)  # rejected drafts (and anything else that differs) go
        ctx.fill_tokens(tokens[n:])
        return list((await ctx.generate(SamplingParams(), max_tokens=k)).token_ids)

    def release(self) -> None:
        if self._ctx is not None:
            self._ctx.release()
            self._ctx = None


def as_drafter(speculator: Any) -> Drafter:
    """A drafter, or a function ``(tokens, k) -> tokens`` (sync or async) made into one."""
    if hasattr(speculator, "propose"):
        return speculator
    if callable(speculator):
        return _FunctionDrafter(speculator)
    raise TypeError("speculator= takes an object with propose(tokens, k) or a function, "
                    f"got {type(speculator).__name__}")


class _FunctionDrafter:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn

    async def propose(self, tokens: list[int], k: int) -> list[int] | Draft:
        out = self._fn(tokens, k)
        return await out if inspect.isawaitable(out) else out


# ---- the target's distribution and the acceptance rule ------------------------------------------

def sampling_distribution(logits: np.ndarray, s: SamplingParams) -> np.ndarray:
    """float64 [n_vocab]: the probability of each token under the sampler ``s`` as the driver
    applies it (finite logits, / temperature, top-k, the smallest prefix reaching top-p, min-p)."""
    x = logits.astype(np.float64)
    ids = np.flatnonzero(np.isfinite(x))
    p = np.zeros(x.shape[0], dtype=np.float64)
    if ids.size == 0:
        return p
    if s.is_greedy:
        p[ids[np.argmax(x[ids])]] = 1.0
        return p
    v = x[ids] / s.temperature
    if s.top_k > 0 and s.top_k < ids.size:
        keep = np.argpartition(-v, s.top_k - 1)[: s.top_k]
        ids, v = ids[keep], v[keep]
    w = np.exp(v - v.max())
    if s.top_p < 1.0:
        order = np.argsort(-v, kind="stable")
        cum = np.cumsum(w[order])
        keep = order[: int(np.searchsorted(cum, s.top_p * cum[-1])) + 1]
        ids, v, w = ids[keep], v[keep], w[keep]
    if s.min_p > 0.0:
        keep = v >= v.max() + np.log(s.min_p)
        ids, w = ids[keep], w[keep]
    p[ids] = w / w.sum()
    return p


def accept_drafts(draft: Sequence[int], target: Callable[[int], np.ndarray], draft_probs: np.ndarray | None,
                  rng: np.random.Generator) -> tuple[int, int | None]:
    """The speculative sampling rule. ``target(i)`` is the target's distribution after draft
    token i-1 (``target(0)``: before the first; asked only as far as needed). Returns (drafts kept,
    the token that replaces the first rejected draft), or (len(draft), None) when all were kept
    (the caller then draws the next token from ``target(len(draft))``)."""
    for i, x in enumerate(draft):
        p = target(i)
        q_x = 1.0 if draft_probs is None else float(draft_probs[i][x])
        if q_x > 0 and rng.random() < min(1.0, p[x] / q_x):
            continue
        if draft_probs is None:
            residual = p.copy()
            residual[x] = 0.0
        else:
            residual = np.maximum(p - draft_probs[i], 0.0)
        total = residual.sum()
        if total <= 0:  # p and q agree everywhere but x was still rejected (rounding): draw from p
            residual, total = p, p.sum()
        cum = np.cumsum(residual)
        return i, int(min(np.searchsorted(cum, rng.random() * total, side="right"), len(cum) - 1))
    return len(draft), None
