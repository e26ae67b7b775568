"""Helpers shared by the standard inferlets: token-by-token decoding that keeps log-probabilities.

The inferlets that score branches (best-of-n, beam search, tree of thought) keep the newest token
of each branch *outside* its context: that token is the input of the branch's next forward pass,
whose output row gives the distribution of the token after it. A branch is therefore
``(context, next_input)``, and forking a branch forks only committed KV.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from pie_local.runtime.sampling import SamplingParams


@dataclass
class Sampled:
    """Tokens drawn by `decode`, with the log-probability of each under the raw distribution."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (EOS or a stop string) or "length"
    next_input: int | None = None  # the token to feed next if the branch continues

    @property
    def logprob(self) -> float:
        return float(sum(self.logprobs))

    @property
    def mean_logprob(self) -> float:
        return self.logprob / len(self.logprobs) if self.logprobs else float("-inf")


def prime(ctx: Any, text: str) -> int:
    """Fill ``text`` into ``ctx`` except its last token, which is returned (the first input)."""
    ctx.fill(text)
    ids = ctx.token_ids
    if not ids:
        raise ValueError("the prompt is empty")
    ctx.truncate(len(ids) - 1)
    return ids[-1]


def step_sampling(sampling: SamplingParams, step: int) -> SamplingParams:
    """Seeded samplers draw with ``seed + step`` so a branch's steps are not one repeated draw."""
    if sampling.is_greedy or sampling.seed is None:
        return sampling
    return sampling.with_seed(sampling.seed + step)


async def decode(ctx: Any, first_input: int, sampling: SamplingParams, max_tokens: int,
                 stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = ()) -> Sampled:
    """Sample up to ``max_tokens`` tokens after ``first_input`` (which goes into the KV first).

    Stops after an id in ``stop_ids`` (not kept) or once the text contains a stop string (the
    token completing it is kept in ``token_ids``; callers cut the text). Each generated token but
    the last is in the KV afterwards; the last is ``next_input``.
    """
    out = Sampled(next_input=first_input)
    tok = ctx.tokenizer
    text = ""
    for step in range(max_tokens):
        fwd = ctx.forward().input([out.next_input]).sample(0, step_sampling(sampling, step))
        res = await fwd.execute()
        token = int(res.tokens[0])
        if token in stop_ids:
            out.finish_reason = "stop"
            out.next_input = token
            return out
        out.token_ids.append(token)
        out.logprobs.append(float(res.logprobs[0]))
        out.next_input = token
        if stop_strings:
            text += tok.piece(token, special=False).decode("utf-8", "replace")
            if any(s in text for s in stop_strings):
                out.finish_reason = "stop"
                return out
    return out


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to the first stop string."""
    cut = len(text)
    for s in stop_strings:
        at = text.find(s)
        if at >= 0:
            cut = min(cut, at)
    return text[:cut]
