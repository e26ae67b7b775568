"""Generation: the decode loop behind `Context.generate()` / `stream()`.

Each step is one forward pass (the scheduler batches every context's step together) that samples
one token, then the stop logic: end-of-generation tokens, stop strings (held back while they may
still be starting), a constraint that is complete, or ``max_tokens``. A step may carry more:
tokens that are forced (what a constraint's grammar forces, a reasoning block's closing tag) go
into the KV in the same pass, unsampled; a drafter's proposal is verified in the pass, a sampled
row at each drafted token (runtime/speculation.py). Constraints (llguidance) give a logit mask
per step; token healing (runtime/healing.py) masks the first steps; a reasoning budget
(runtime/reasoning.py) splits the text into reasoning and answer. With tools, the model writes a
call in its chat template's tool format, the runtime runs the tool and appends the result as a
"tool" message to the same KV (no re-prefill), and the model continues until it answers without a
call or ``max_tool_calls`` rounds were used.
"""

from __future__ import annotations

import codecs
import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

import numpy as np

from pie_local.runtime.healing import take_back
from pie_local.runtime.logprobs import allowed_logprob, allowed_top, count_allowed, mask_to_bool, raw_logprob
from pie_local.runtime.reasoning import Reasoning, ReasoningSplitter
from pie_local.runtime.sampling import SamplingParams, StopChecker
from pie_local.runtime.speculation import Draft, accept_drafts, as_drafter, sampling_distribution

if TYPE_CHECKING:
    from pie_local.runtime.context import Context


@dataclass
class Generation:
    """What the last generate()/stream() of a context produced."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log p of each of token_ids (nan: not sampled)
    # constrained generations: log p of each token renormalised over the tokens the constraint allowed
    allowed_logprobs: list[float] = field(default_factory=list)
    # per token, when asked (constrained: the allowed tokens only, with renormalised log-probabilities)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str = ""  # "stop" (EOS, stop string, constraint done), "length" (max_tokens or the model's
    # context is full), "aborted" (stream left early)
    stop: str | None = None  # the stop string or EOS token text that ended it
    tool_calls: list[Any] = field(default_factory=list)
    prompt_tokens: int = 0  # tokens in the context when the first pass started (the prompt)
    cached_tokens: int = 0  # of those, tokens this generation did not compute (in KV already, or prefix cache)
    forward_passes: int = 0  # passes this generation ran (fewer than tokens when tokens were forced)
    # tokens forced by a constraint (llguidance's fast-forward) or a reasoning budget (the closing
    # tag): computed in the pass of the next sampled token, never sampled, so their raw logprob is nan
    # (and their allowed_logprob 0 under a constraint)
    forced_tokens: int = 0
    reasoning: str = ""  # with reasoning=: the reasoning block's text (the answer is `text`)
    reasoning_tokens: int = 0  # tokens generated inside the reasoning block (its closing tag too)
    drafted_tokens: int = 0  # with speculator=: tokens the drafter proposed
    accepted_tokens: int = 0  # of those, tokens verification kept


class GenerationResult(str):
    """What generate() returns: the text itself (a ``str``, so callers that only want text keep
    working) that also answers every field of its `Generation`: ``result.token_ids``,
    ``result.logprobs``, ``result.finish_reason``... (``result.generation`` is the Generation).
    With tools the text is every round's, the Generation the last round's."""

    generation: Generation

    def __new__(cls, text: str, generation: Generation) -> GenerationResult:
        result = super().__new__(cls, text)
        result.generation = generation
        return result

    @property
    def text(self) -> str:
        return str(self)

    def __getattr__(self, name: str) -> Any:  # only called for names str itself lacks
        if name == "generation":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.generation, name)


@dataclass
class GenerateOptions:
    """Everything generate()/stream() were asked, in one place."""

    sampling: SamplingParams | None = None
    max_tokens: int = 256
    stop: Sequence[str] | None = None
    constrain: Any = None
    tools: Any = None
    max_tool_calls: int = 8
    top_logprobs: int = 0
    fast_forward: bool = True  # tokens a constraint forces go into the KV in one pass, unsampled
    heal: bool = False  # token healing: take the prompt's last token back, begin with its bytes
    reasoning: Reasoning | None = None  # a budget for the reasoning block; the answer is the text
    speculator: Any = None  # a drafter (runtime/speculation.py): its drafts are verified in one pass
    draft_tokens: int = 8  # tokens a drafter may propose per pass


async def stream(ctx: Context, opts: GenerateOptions) -> AsyncIterator[str]:
    """Text pieces as they are decoded; ``ctx.last`` holds the whole Generation."""
    pieces = _stream_with_tools(ctx, opts) if opts.tools else _stream_once(ctx, opts)
    async with contextlib.aclosing(pieces):  # leaving early finalizes the generation now
        async for piece in pieces:
            yield piece


@dataclass
class _Token:
    """A token one step produced, with what is known of its probability."""

    id: int
    logprob: float = math.nan  # raw log p (nan: not measured, e.g. a forced token)
    allowed: float | None = None  # renormalised over the allowed tokens (constrained generations)
    top: list[tuple[int, float]] | None = None  # when top_logprobs was asked
    in_context: bool = True  # already in the context (a forced token); a sampled one is filled on acceptance


def _top(out: Any, row: int) -> list[tuple[int, float]]:
    """The driver's top-k probe of an output row, as (token, log-probability) pairs."""
    return [(int(i), math.log(max(float(p), 1e-45))) for i, p in zip(out.top_ids[row], out.top_probs[row])]


class _TextDecoder:
    """Generated tokens to text as they arrive, never splitting a UTF-8 character, after skipping
    the first ``skip`` bytes (the end of the prompt that token healing took back)."""

    def __init__(self, tokenizer: Any, skip: int = 0) -> None:
        self._tok = tokenizer
        self._skip = skip
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        data = self._tok.piece(token, special=False)
        if self._skip:
            n = min(self._skip, len(data))
            data, self._skip = data[n:], self._skip - n
        return self._utf8.decode(data)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class _Run:
    """One generation: its settings, the text so far and the stop logic. A step yields tokens; each
    goes through `accept`, which keeps it (or not) and says whether the generation is over."""

    def __init__(self, ctx: Context, opts: GenerateOptions) -> None:
        ctx.sequence.check_alive()
        if opts.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {opts.max_tokens}")
        if opts.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {opts.top_logprobs}")
        self.ctx, self.seq, self.tok, self.opts = ctx, ctx.sequence, ctx.tokenizer, opts
        sampling = opts.sampling or SamplingParams()
        if sampling.seed is None and not sampling.is_greedy:
            sampling = sampling.with_seed(random.getrandbits(63))
        self.sampling = sampling
        stops = list(opts.stop or [])
        self.turn = ctx.begin_assistant_turn()  # the template's generation prompt, when the chat awaits a reply
        if self.turn is not None:
            stops += [s for s in ctx.chat_stop_strings if s not in stops]
        self.reasoning = None
        if opts.reasoning is not None:
            self.reasoning = ReasoningSplitter(opts.reasoning, self.tok.decode(ctx.token_ids[-16:]))
        self.healing = None
        if opts.heal:
            if opts.constrain is not None:
                raise ValueError("heal=True cannot be combined with constrain= (the healed token would start "
                                 "inside the constraint's first token)")
            self.healing = take_back(ctx)
        self.drafter = None
        if opts.speculator is not None:
            if opts.constrain is not None:
                raise ValueError("speculator= cannot be combined with constrain= yet (drafts would need the "
                                 "constraint's masks at every verified row)")
            if opts.draft_tokens < 1:
                raise ValueError(f"draft_tokens must be >= 1, got {opts.draft_tokens}")
            self.drafter = as_drafter(opts.speculator)
        if not self.seq.pending:
            self.seq.uncommit_last()  # the last token is the first pass's input
        self.state = None if opts.constrain is None else bind_constraints(opts.constrain, self.tok)
        self.n_vocab = ctx.engine_info.n_vocab
        self.decoder = _TextDecoder(self.tok, skip=len(self.healing.prefix) if self.healing else 0)
        self.checker = StopChecker(stops)
        self.gen = Generation(finish_reason="length", prompt_tokens=len(self.seq))
        ctx.last = self.gen
        self.text_parts: list[str] = []  # the answer
        self.full_parts: list[str] = []  # all the output's text (with a reasoning block)
        self.over = False  # a stop condition was met
        self._computed_before, self._adopted_before = self.seq.kv_len, self.seq.adopted_tokens

    @property
    def budget(self) -> int:
        """Tokens that may still be generated."""
        return self.opts.max_tokens - len(self.gen.token_ids)

    # ---- steps -----------------------------------------------------------------------------------

    async def step(self) -> list[_Token]:
        """One forward pass: the tokens that are forced (a reasoning block's closing tag, what the
        constraint forces) and one sampled token after them, or a drafter's proposal verified.
        Returns the tokens it produced, in order."""
        forced = self._force(self._closing_tokens(), [])
        forced = self._force(self._fast_forward_tokens(), forced)
        if forced and (len(forced) >= self.budget or (self.state is not None and self.state.is_done())):
            # nothing is left to sample: the forced tokens wait in the context, uncomputed, as the
            # last sampled token of a generation does
            self.ctx.fill_tokens(forced)
            return [_Token(t, **self._forced_probs(t)) for t in forced]
        healing = self.healing is not None and self.healing.active
        if not forced and not healing and self.drafter is not None:
            draft = await self._propose()
            if draft.tokens:
                return await self._verify(draft)
        return [_Token(t, **self._forced_probs(t)) for t in forced] + [await self._sample(forced, healing)]

    async def _sample(self, forced: list[int], healing: bool) -> _Token:
        """Compute the pending and ``forced`` tokens and sample the token after them, under the
        constraint's (or token healing's) mask."""
        mask = None
        if healing:
            mask = self.healing.mask()
        elif self.state is not None:
            mask = self.state.mask()
        # a constrained step reports log p over the allowed tokens too: from the row's logits,
        # unless the mask forces one token
        renormalise = self.state is not None and count_allowed(mask) > 1
        top_k = self.opts.top_logprobs
        out = await self.seq.submit(forced, None, None, rows=[len(self.seq.pending) - 1 + len(forced)],
                                    samplers=[self.sampling.for_step(len(self.gen.token_ids) + len(forced))],
                                    logit_masks=None if mask is None else mask[None, :],
                                    top_k=0 if self.state is not None else top_k, want_logits=renormalise)
        self._count_pass()
        token = int(out.tokens[0])
        if self.state is not None:
            self.state.advance(token)
        if healing:
            self.healing.advance(self.tok.piece(token, special=False))
        sampled = _Token(token, float(out.logprobs[0]), in_context=False)
        if self.state is not None:
            allowed = mask_to_bool(mask, self.n_vocab) if renormalise else None
            sampled.allowed = allowed_logprob(out.logits[0], allowed, token) if renormalise else 0.0
            if top_k:
                sampled.top = allowed_top(out.logits[0], allowed, top_k) if renormalise else [(token, 0.0)]
        elif top_k:
            sampled.top = _top(out, 0)
        return sampled

    def _count_pass(self) -> None:
        self.gen.forward_passes += 1
        if self.gen.forward_passes == 1:
            self.gen.cached_tokens = self._computed_before + self.seq.adopted_tokens - self._adopted_before

    # ---- speculation -----------------------------------------------------------------------------

    async def _propose(self) -> Draft:
        """The drafter's proposal, no longer than what may still be generated."""
        k = min(self.opts.draft_tokens, self.budget - 1)
        if self.seq.max_position is not None:
            k = min(k, self.seq.max_position - self.seq.next_position)  # every draft and the token after
        if self.reasoning is not None and self.reasoning.thinking:
            k = min(k, self.reasoning.config.budget - self.reasoning.tokens - 1)
        if k <= 0:
            return Draft([])
        proposal = await self.drafter.propose(self.ctx.token_ids, k)
        draft = proposal if isinstance(proposal, Draft) else Draft(list(proposal))
        draft.tokens = [int(t) for t in draft.tokens[:k]]
        for t in draft.tokens:
            if not 0 <= t < self.n_vocab:
                raise ValueError(f"the drafter proposed token id {t}, outside [0, {self.n_vocab})")
        return draft

    async def _verify(self, draft: Draft) -> list[_Token]:
        """One pass over the pending token and the draft, a sampled row at each; keep what the rule
        accepts (runtime/speculation.py), drop the KV of the rest."""
        d = draft.tokens
        n_done, greedy, top_k = len(self.gen.token_ids), self.sampling.is_greedy, self.opts.top_logprobs
        first = len(self.seq.pending) - 1
        start = len(self.seq)
        out = await self.seq.submit(d, None, None, rows=[first + i for i in range(len(d) + 1)],
                                    samplers=[self.sampling.for_step(n_done + i) for i in range(len(d) + 1)],
                                    top_k=top_k, want_logits=not greedy)
        self._count_pass()
        if greedy:  # row i's token is the model's choice after draft token i-1: keep while they agree
            n_ok = 0
            while n_ok < len(d) and int(out.tokens[n_ok]) == d[n_ok]:
                n_ok += 1
            last = None
        else:
            rng = np.random.default_rng([self.sampling.seed or 0, n_done])
            n_ok, last = accept_drafts(d, lambda i: sampling_distribution(out.logits[i], self.sampling),
                                       draft.probs, rng)
        self.seq.truncate(start + n_ok)  # the rejected drafts' KV
        self.gen.drafted_tokens += len(d)
        self.gen.accepted_tokens += n_ok
        self.seq.engine.counters.record_speculation(len(d), n_ok)

        def logprob(row: int, token: int) -> float:
            if token == int(out.tokens[row]):
                return float(out.logprobs[row])
            return raw_logprob(out.logits[row], token)  # sampling: a kept draft or a residual draw

        def top(row: int) -> list[tuple[int, float]] | None:
            return _top(out, row) if top_k else None

        tokens = [_Token(d[i], logprob(i, d[i]), top=top(i)) for i in range(n_ok)]
        if last is None:  # all drafts kept (or greedy): the row's own sample follows them
            last = int(out.tokens[n_ok])
        return tokens + [_Token(last, logprob(n_ok, last), top=top(n_ok), in_context=False)]

    # ---- forced tokens ---------------------------------------------------------------------------

    def _closing_tokens(self) -> list[int]:
        """The reasoning block's closing tag, once its budget is spent (the constraint, if any,
        consumes it: a Triggered grammar on the tag starts the answer's)."""
        if self.reasoning is None or not self.reasoning.over_budget:
            return []
        return self.tok.encode(self.reasoning.config.close, add_special=False, parse_special=True)

    def _fast_forward_tokens(self) -> list[int]:
        """Tokens the constraint forces next (llguidance's fast-forward)."""
        forced_tokens = getattr(self.state, "forced_tokens", None)  # optional for a state of one's own
        if forced_tokens is None or not self.opts.fast_forward:
            return []
        return forced_tokens()

    def _force(self, tokens: list[int], before: list[int]) -> list[int]:
        """``before`` + as many of ``tokens`` as the budget and the model's context allow after
        it; the constraint consumes them."""
        room = self.budget - len(before)
        if self.seq.max_position is not None:
            room = min(room, self.seq.max_position + 1 - self.seq.next_position - len(before))
        taken = tokens[: max(room, 0)]
        for t in taken:
            if self.state is not None:
                self.state.advance(t)
        self.gen.forced_tokens += len(taken)
        return before + taken

    def _forced_probs(self, token: int) -> dict[str, Any]:
        """A forced token is certain under the constraint; its raw log p was not computed."""
        if self.state is None:
            return {"top": [] if self.opts.top_logprobs else None}
        return {"allowed": 0.0, "top": [(token, 0.0)] if self.opts.top_logprobs else None}

    # ---- stop logic ------------------------------------------------------------------------------

    def accept(self, t: _Token, last: bool) -> tuple[str, bool]:
        """Take one token of a step: (text to show now, whether it stays in the context). Sets
        ``over`` when the generation ends with it (``last``: the step's last token)."""
        gen, seq = self.gen, self.seq
        if t.id in self.tok.eos_ids:
            gen.finish_reason, gen.stop, self.over = "stop", self.tok.decode([t.id]), True
            return "", False
        if not t.in_context and seq.max_position is not None and seq.next_position > seq.max_position:
            self.over = True  # the model's context is full: the token has no position; finish_reason stays "length"
            return "", False
        gen.token_ids.append(t.id)
        gen.logprobs.append(t.logprob)
        if t.allowed is not None:
            gen.allowed_logprobs.append(t.allowed)
        if t.top is not None:
            gen.top_logprobs.append(t.top)
        if not t.in_context:
            self.ctx.fill_tokens([t.id])
        if self.reasoning is not None:
            self.reasoning.count()
        visible = self._show(self.checker.push(self.decoder.push(t.id)))
        if self.checker.stopped:
            gen.finish_reason, gen.stop, self.over = "stop", self.checker.matched, True
        elif last and self.state is not None and self.state.is_done():
            gen.finish_reason, self.over = "stop", True
        elif not self.budget:
            self.over = True
        return visible, True

    def _show(self, text: str) -> str:
        """Output text past the stop strings -> the answer text to show (a reasoning block apart)."""
        if text:
            self.full_parts.append(text)
        if self.reasoning is not None:
            text = self.reasoning.push(text)
        if text:
            self.text_parts.append(text)
        return text

    def flush(self) -> str:
        """The text held back at the end (an unfinished character, a stop-string or tag prefix)."""
        rest = ""
        if not self.checker.stopped:
            rest = self.checker.push(self.decoder.flush()) + self.checker.finish()
            if self.checker.stopped:
                self.gen.finish_reason, self.gen.stop = "stop", self.checker.matched
        shown = self._show(rest)
        if self.reasoning is not None:
            tail = self.reasoning.finish()
            if tail:
                self.text_parts.append(tail)
            shown += tail
        return shown

    def finish(self, completed: bool) -> None:
        gen = self.gen
        gen.text = "".join(self.text_parts)
        output = "".join(self.full_parts)  # what the context holds after the prompt
        if self.reasoning is not None:
            gen.reasoning, gen.reasoning_tokens = self.reasoning.reasoning, self.reasoning.tokens
        if not completed:
            gen.finish_reason = "aborted"
        elif self.checker.stopped:
            _cut_stop_string(self.ctx, gen, output, with_top=self.opts.top_logprobs > 0,
                             constrained=self.state is not None, healed=self.healing.prefix if self.healing else b"")
        if self.turn is not None and not self.seq.released and not self.seq.busy:
            self.ctx.end_assistant_turn(self.turn, output)


async def _stream_once(ctx: Context, opts: GenerateOptions) -> AsyncIterator[str]:
    run = _Run(ctx, opts)
    seq = ctx.sequence
    completed = False
    try:
        while not run.over and run.budget > 0:
            start = len(seq)  # the step's tokens come after this
            tokens = await run.step()
            kept = 0
            for i, token in enumerate(tokens):
                visible, keep = run.accept(token, last=i == len(tokens) - 1)
                kept += keep
                if visible:
                    yield visible
                if run.over:
                    break
            if run.over and len(seq) > start + kept:
                seq.truncate(start + kept)  # tokens of the step after the one that ended it
        rest = run.flush()
        if rest:
            yield rest
        completed = True
    finally:  # also when the caller stops iterating early or the pass fails
        run.finish(completed)


def _cut_stop_string(ctx: Context, gen: Generation, output: str, with_top: bool, constrained: bool,
                     healed: bytes) -> None:
    """Keep in the context exactly the ``output`` before the stop string (after the ``healed`` bytes
    of the prompt the output begins with): drop the tokens of the stop string."""
    tok = ctx.tokenizer
    want = healed + output.encode()
    kept, size = 0, 0
    for t in gen.token_ids:
        piece = tok.piece(t, special=False)
        if size + len(piece) > len(want) or want[size : size + len(piece)] != piece:
            break
        kept, size = kept + 1, size + len(piece)
    ctx.sequence.truncate(len(ctx) - (len(gen.token_ids) - kept))
    gen.token_ids, gen.logprobs = gen.token_ids[:kept], gen.logprobs[:kept]
    gen.top_logprobs, gen.allowed_logprobs = gen.top_logprobs[:kept], gen.allowed_logprobs[:kept]
    leftover = want[size:].decode("utf-8", errors="ignore")
    if leftover:
        ids = tok.encode(leftover, add_special=False, parse_special=False)
        ctx.fill_tokens(ids)
        gen.token_ids += ids
        gen.logprobs += [float("nan")] * len(ids)  # re-encoded text, not sampled
        if constrained:
            gen.allowed_logprobs += [float("nan")] * len(ids)
        if with_top:
            gen.top_logprobs += [[] for _ in ids]


async def _stream_with_tools(ctx: Context, opts: GenerateOptions) -> AsyncIterator[str]:
    from pie_local.runtime.tools import as_tools, call_tool

    tools = as_tools(opts.tools)
    max_tool_calls = opts.max_tool_calls
    if not ctx.messages:
        raise ValueError("generate(tools=...) needs a chat context: add messages with ctx.system()/ctx.user() first")
    ctx.set_tools([t.schema for t in tools])
    calls_made: list[Any] = []
    for round_ in range(max_tool_calls + 1):
        async with contextlib.aclosing(_stream_once(ctx, opts)) as pieces:
            async for piece in pieces:
                yield piece
        gen = ctx.last
        calls = ctx.chat_template.parse_tool_calls(gen.text) if round_ < max_tool_calls else []
        if not calls:
            break
        calls_made += calls
        # the reply was a call: record it as such, then answer each call with a tool message
        ctx.replace_last_message({"role": "assistant", "content": gen.text,
                                  "tool_calls": [c.to_message() for c in calls]})
        for call in calls:
            result = await call_tool(tools, call)
            ctx.add_message(result.to_message(call))
    ctx.last.tool_calls = calls_made


def bind_constraints(constrain: Any, tokenizer: Any) -> Any:
    """One constraint (anything with bind(tokenizer) -> state) or a list of them (all must hold)."""
    items = list(constrain) if isinstance(constrain, (list, tuple)) else [constrain]
    if not items:
        return None
    for c in items:
        if not hasattr(c, "bind"):
            raise TypeError(f"constrain= takes constraints (JsonSchema, Regex, Grammar...), got {type(c).__name__}")
    states = [c.bind(tokenizer) for c in items]
    if len(states) == 1:
        return states[0]
    from pie_local.runtime.constraints import AllOfState

    return AllOfState(states)
