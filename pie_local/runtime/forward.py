"""Forward requests: what one context asks of one forward pass, and the low-level `Forward` builder.

A `ForwardRequest` is the scheduler's unit: a context's new tokens (with positions and optional
BRLE masks), the page table its KV will have after the pass, the rows to sample, and callbacks
that commit the result to the context (or undo the page allocations on failure). The scheduler
may split a long request into chunks across several batches.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from pie_local.driver.brle import decode as brle_decode
from pie_local.driver.brle import encode as brle
from pie_local.driver.types import SamplingParams
from pie_local.runtime.logprobs import allowed_logprob, allowed_top, mask_to_bool

if TYPE_CHECKING:
    from pie_local.runtime.context import Context

__all__ = ["Forward", "ForwardOutput", "ForwardRequest", "brle", "brle_decode"]

_arrival = itertools.count()
_PROBE_ONLY = SamplingParams()  # the sampler of a row that is only probed (greedy)


# --------------------------------------------------------------------------------------------
# What the scheduler runs
# --------------------------------------------------------------------------------------------

@dataclass
class ForwardOutput:
    """Per output row (in ``rows`` order): the sampled token and the probes asked for."""

    rows: list[int]
    tokens: np.ndarray  # int32 [n_rows]
    logprobs: np.ndarray | None = None  # float32 [n_rows]
    top_ids: np.ndarray | None = None  # int32 [n_rows, top_k]
    top_probs: np.ndarray | None = None  # float32 [n_rows, top_k]
    entropy: np.ndarray | None = None  # float32 [n_rows], nats
    logits: np.ndarray | None = None  # float32 [n_rows, n_vocab]
    hidden: np.ndarray | None = None  # float32 [n_rows, n_embd]: final hidden states (after the output norm)
    # probed rows sampled under a logit mask: log p of the token renormalised over the allowed
    # tokens (nan on other rows); their top_ids/top_probs then list allowed tokens only, renormalised
    allowed_logprobs: np.ndarray | None = None  # float32 [n_rows]

    def token_at(self, row: int) -> int:
        return int(self.tokens[self.rows.index(row)])

    @classmethod
    def empty(cls, rows: list[int], top_k: int, n_vocab: int | None, n_embd: int | None = None) -> ForwardOutput:
        """Zeroed arrays for ``rows`` that the scheduler fills chunk by chunk (logits when n_vocab,
        hidden states when n_embd)."""
        n = len(rows)
        return cls(rows=list(rows), tokens=np.zeros(n, np.int32), logprobs=np.zeros(n, np.float32),
                   top_ids=np.zeros((n, top_k), np.int32) if top_k else None,
                   top_probs=np.zeros((n, top_k), np.float32) if top_k else None,
                   logits=np.zeros((n, n_vocab), np.float32) if n_vocab else None,
                   hidden=np.zeros((n, n_embd), np.float32) if n_embd else None)


@dataclass(eq=False)
class ForwardRequest:
    tokens: np.ndarray  # int32 [n]
    positions: np.ndarray  # int32 [n]
    masks: list[list[int] | None] | None  # per token BRLE over the KV after the pass, or None
    kv_before: int  # the context's KV length before the pass
    pages: list[int]  # page ids of the KV after the pass, in order
    output_rows: list[int]  # indices into tokens, ascending
    samplers: list[SamplingParams]
    logit_masks: np.ndarray | None = None  # uint32 [n_outputs, words]
    top_k: int = 0
    want_logits: bool = False
    want_hidden: bool = False  # the output rows' final hidden states (embeddings)
    hidden_only: bool = False  # its rows are only read for hidden states: a batch of such rows skips the LM head
    whole: bool = False  # computed in one batch, never split into chunks (an embedding model's bidirectional pass)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) before the first chunk
    owner: Any = None  # the inferlet (None for a context the caller owns)
    context: Any = None  # the context it belongs to (the scheduler waits for it to queue its next step)
    on_chunk: Callable[[int], None] | None = None  # KV length computed so far, after each chunk
    on_complete: Callable[[ForwardOutput], None] | None = None  # commits the pass to the context
    on_abort: Callable[[], None] | None = None
    done: int = 0  # tokens computed by earlier chunks
    cancelled: bool = False
    in_flight: bool = False
    seq: int = field(default_factory=lambda: next(_arrival))
    future: asyncio.Future | None = None  # resolves to `output` once the last chunk is done
    output: ForwardOutput | None = None  # filled by the scheduler as the chunks complete

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def remaining(self) -> int:
        return self.n_tokens - self.done


def entropy_of(logits: np.ndarray) -> np.ndarray:
    """float32 [n_rows]: the entropy (nats) of each row of logits."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    return (-(p * np.log(np.clip(p, 1e-300, None))).sum(axis=-1)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# The low-level builder inferlets use
# --------------------------------------------------------------------------------------------

@dataclass
class _Sample:
    rows: list[int]
    sampling: SamplingParams
    logit_mask: np.ndarray | None


class Forward:
    """One forward pass of one context, shaped by the inferlet.

    ``input()`` appends tokens (positions default to the context's next positions; ``masks`` is a
    BRLE run list per token over the context's KV indices after this pass, or None for plain
    causal attention). ``sample()`` and ``probe()`` choose output rows (indices into the tokens
    given to this Forward). ``execute()`` runs it; the input tokens become part of the context.
    """

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._tokens: list[int] = []
        self._positions: list[int] | None = None
        self._masks: list[list[int] | None] = []
        self._has_masks = False
        self._samples: list[_Sample] = []
        self._probe_rows: set[int] = set()
        self._top_k = 0
        self._entropy = False
        self._logits = False

    def input(self, tokens: Sequence[int], positions: Sequence[int] | None = None,
              masks: Sequence[Sequence[int] | None] | None = None) -> Forward:
        tokens = [int(t) for t in tokens]
        if positions is not None and len(positions) != len(tokens):
            raise ValueError(f"{len(positions)} positions for {len(tokens)} tokens")
        if masks is not None and len(masks) != len(tokens):
            raise ValueError(f"{len(masks)} masks for {len(tokens)} tokens")
        if positions is not None:
            if self._positions is None:
                start = self._ctx.next_position
                self._positions = list(range(start, start + len(self._tokens)))
            self._positions += [int(p) for p in positions]
        elif self._positions is not None:
            start = self._positions[-1] + 1 if self._positions else self._ctx.next_position
            self._positions += list(range(start, start + len(tokens)))
        self._masks += [None if m is None else [int(r) for r in m] for m in (masks or [None] * len(tokens))]
        self._has_masks |= masks is not None and any(m is not None for m in masks)
        self._tokens += tokens
        return self

    def sample(self, rows: Sequence[int] | int, sampling: SamplingParams | None = None,
               logit_mask: np.ndarray | None = None) -> Forward:
        rows = [rows] if isinstance(rows, int) else [int(r) for r in rows]
        self._samples.append(_Sample(rows, sampling or SamplingParams(), logit_mask))
        return self

    def probe(self, rows: Sequence[int] | int, logprobs: bool = True, top_k: int = 0,
              entropy: bool = False, logits: bool = False) -> Forward:
        """Return probes for ``rows``: the log-probability of the row's token (always computed),
        the ``top_k`` most probable ids, the entropy (nats) and/or the raw logits. On a row sampled
        under a logit mask the top-k lists allowed tokens only, and ``allowed_logprobs`` gives the
        token's log-probability renormalised over them (``logprobs`` stays the raw one)."""
        rows = [rows] if isinstance(rows, int) else [int(r) for r in rows]
        self._probe_rows.update(rows)
        self._top_k = max(self._top_k, int(top_k))
        self._entropy |= entropy
        self._logits |= logits
        return self

    async def execute(self) -> ForwardOutput:
        if not self._tokens:
            raise ValueError("Forward.execute() with no input tokens")
        n = len(self._tokens)
        sampler_of: dict[int, tuple[SamplingParams, np.ndarray | None]] = {}
        for s in self._samples:
            for r in s.rows:
                sampler_of[r] = (s.sampling, s.logit_mask)
        rows = sorted(set(sampler_of) | self._probe_rows)
        for r in rows:
            if not 0 <= r < n:
                raise ValueError(f"output row {r} outside this forward's {n} tokens")
        samplers = [sampler_of[r][0] if r in sampler_of else _PROBE_ONLY for r in rows]
        logit_masks = None
        if any(sampler_of.get(r, (None, None))[1] is not None for r in rows):
            words = (self._ctx.engine_info.n_vocab + 31) // 32
            logit_masks = np.full((len(rows), words), 0xFFFFFFFF, dtype=np.uint32)
            for i, r in enumerate(rows):
                mask = sampler_of.get(r, (None, None))[1]
                if mask is not None:
                    logit_masks[i] = mask
        masked_probes = [i for i, r in enumerate(rows)
                         if r in self._probe_rows and sampler_of.get(r, (None, None))[1] is not None]
        out = await self._ctx.run_forward(
            self._tokens, self._positions, self._masks if self._has_masks else None, rows, samplers,
            logit_masks=logit_masks, top_k=self._top_k,
            want_logits=self._logits or self._entropy or bool(masked_probes),
        )
        if masked_probes:
            _renormalise(out, masked_probes, logit_masks, self._top_k)
        if self._entropy and out.logits is not None:
            out.entropy = entropy_of(out.logits)
        if not self._logits:
            out.logits = None
        return out


def _renormalise(out: ForwardOutput, indices: list[int], logit_masks: np.ndarray, top_k: int) -> None:
    """Probes of the output rows ``indices`` over the tokens their logit masks allow."""
    n_vocab = out.logits.shape[1]
    out.allowed_logprobs = np.full(len(out.rows), np.nan, dtype=np.float32)
    if top_k:  # the arrays may be views of the batch result: write into copies
        out.top_ids, out.top_probs = out.top_ids.copy(), out.top_probs.copy()
    for i in indices:
        allowed = mask_to_bool(logit_masks[i], n_vocab)
        out.allowed_logprobs[i] = allowed_logprob(out.logits[i], allowed, int(out.tokens[i]))
        if top_k:
            top = allowed_top(out.logits[i], allowed, top_k)
            out.top_ids[i], out.top_probs[i] = 0, 0.0  # fewer allowed tokens than top_k: zero padding
            for j, (token, logprob) in enumerate(top):
                out.top_ids[i, j], out.top_probs[i, j] = token, np.exp(logprob)
