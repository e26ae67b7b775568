"""Scoring continuations: `Context.score()` (teacher forcing, one pass) and `Context.select()`
(several continuations from forks of one prefix, scored in one batch).

A continuation's tokens go through one forward pass after the context, with an output row before
each of them. Each row is "sampled" greedily under a one-hot logit mask, so the driver picks
exactly the continuation's token and its raw log-probability probe is log p(token | prefix): no
row of logits leaves the driver unless a constraint needs the renormalisation. The context is
left as it was (the continuation's KV is dropped again).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from pie_local.runtime.generation import bind_constraints
from pie_local.runtime.logprobs import allowed_logprob, mask_to_bool, one_hot_masks
from pie_local.runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from pie_local.runtime.context import Context


@dataclass
class Score:
    """How probable a continuation is after a context."""

    token_ids: list[int]
    logprobs: list[float]  # log p of each token under the model (raw softmax)
    # under constrain=: log p renormalised over the tokens the constraint allowed at that point
    # (-inf from the first token the constraint forbids on); None without a constraint
    allowed_logprobs: list[float] | None = None

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))

    @property
    def mean(self) -> float:
        """Token-length normalised: the total divided by the number of tokens."""
        return self.total / len(self.logprobs) if self.logprobs else float("-inf")

    def value(self, normalize: bool) -> float:
        return self.mean if normalize else self.total


@dataclass
class Selection:
    """The result of `Context.select()`: the best option and every option's score."""

    index: int  # of the best option
    option: str | list[int]  # the best option, as given
    scores: list[Score]  # one per option, in the order given
    normalize: bool  # ranked by mean log-probability per token (True) or by total (False)

    @property
    def best(self) -> Score:
        return self.scores[self.index]

    @property
    def values(self) -> list[float]:
        """What the options were ranked by, in the order given."""
        return [s.value(self.normalize) for s in self.scores]


def continuation_ids(ctx: Context, continuation: str | Sequence[int]) -> list[int]:
    """A continuation as token ids: text is tokenized on its own (no BOS, no special tokens)."""
    if isinstance(continuation, str):
        ids = ctx.tokenizer.encode(continuation, add_special=False, parse_special=False)
    else:
        ids = [int(t) for t in continuation]
    n_vocab = ctx.engine_info.n_vocab
    for t in ids:
        if not 0 <= t < n_vocab:
            raise ValueError(f"token id {t} out of range [0, {n_vocab})")
    if not ids:
        raise ValueError("the continuation to score is empty")
    return ids


async def score(ctx: Context, continuation: str | Sequence[int], constrain: Any = None) -> Score:
    ids = continuation_ids(ctx, continuation)
    seq = ctx.sequence
    seq.check_alive()
    seq.check_idle("score")
    n0 = len(seq)
    if n0 == 0:
        raise ValueError("score() needs a prefix to condition on: fill() the context first")
    n_vocab = ctx.engine_info.n_vocab
    allowed = _allowed_masks(bind_constraints(constrain, ctx.tokenizer), ids, n_vocab) if constrain else None
    # rows whose renormalisation needs the logits: the token is allowed along with others
    want_logits = allowed is not None and any(a is not None and a.sum() > 1 for a in allowed)
    if not seq.pending:
        seq.uncommit_last()  # its row gives the first token's distribution
    first = len(seq.pending) - 1
    try:
        out = await seq.submit(ids, None, None, [first + i for i in range(len(ids))],
                               [SamplingParams()] * len(ids), logit_masks=one_hot_masks(ids, n_vocab),
                               want_logits=want_logits)
    finally:
        if not seq.released and not seq.busy:
            seq.truncate(n0)
    result = Score(list(ids), [float(x) for x in out.logprobs])
    if allowed is not None:
        result.allowed_logprobs = []
        for i, (t, a) in enumerate(zip(ids, allowed)):
            if a is None or not a[t]:
                result.allowed_logprobs.append(float("-inf"))
            elif a.sum() == 1:
                result.allowed_logprobs.append(0.0)
            else:
                result.allowed_logprobs.append(allowed_logprob(out.logits[i], a, t))
    return result


def _allowed_masks(state: Any, ids: list[int], n_vocab: int) -> list[Any]:
    """What the constraint allows before each token (None once a token left it)."""
    masks: list[Any] = []
    for t in ids:
        if state is None:
            masks.append(None)
            continue
        allowed = mask_to_bool(state.mask(), n_vocab)
        masks.append(allowed)
        if allowed[t]:
            state.advance(t)
        else:
            state = None
    return masks


async def select(ctx: Context, options: Sequence[str | Sequence[int]], normalize: bool = True) -> Selection:
    if not options:
        raise ValueError("select() needs at least one option")
    ids = [continuation_ids(ctx, o) for o in options]
    await ctx.flush()  # the shared prefix is computed once; every fork shares its pages
    forks = ctx.fork(len(ids))
    try:
        scores = await asyncio.gather(*(score(f, i) for f, i in zip(forks, ids)))
    finally:
        for f in forks:
            f.release()
    values = [s.value(normalize) for s in scores]
    best = max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first option
    ctx.fill_tokens(ids[best])
    option = options[best]
    return Selection(best, option if isinstance(option, str) else list(option), list(scores), normalize)
