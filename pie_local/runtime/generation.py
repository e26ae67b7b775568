"""Generation: the decode loop behind `Context.generate()` / `stream()`.

One forward pass per token (the scheduler batches every context's step together), then the stop
logic: end-of-generation tokens, stop strings (held back while they may still be starting), a
constraint that is complete, or ``max_tokens``. Constraints (llguidance) give a logit mask per
step. With tools, the model writes a call in its chat template's tool format, the runtime runs
the tool and appends the result as a "tool" message to the same KV (no re-prefill), and the
model continues until it answers without a call or ``max_tool_calls`` rounds were used.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

from pie_local.runtime.logprobs import allowed_logprob, allowed_top, count_allowed, mask_to_bool
from pie_local.runtime.sampling import SamplingParams, StopChecker

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


async def stream(ctx: Context, sampling: SamplingParams | None, max_tokens: int, stop: Sequence[str] | None,
                 constrain: Any, tools: Any, max_tool_calls: int, top_logprobs: int) -> AsyncIterator[str]:
    """Text pieces as they are decoded; ``ctx.last`` holds the whole Generation."""
    if tools:
        pieces = _stream_with_tools(ctx, sampling, max_tokens, stop, constrain, tools, max_tool_calls, top_logprobs)
    else:
        pieces = _stream_once(ctx, sampling, max_tokens, stop, constrain, top_logprobs)
    async with contextlib.aclosing(pieces):  # leaving early finalizes the generation now
        async for piece in pieces:
            yield piece


async def _stream_once(ctx: Context, sampling: SamplingParams | None, max_tokens: int, stop: Sequence[str] | None,
                       constrain: Any, top_logprobs: int) -> AsyncIterator[str]:
    seq = ctx.sequence
    seq.check_alive()
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    if top_logprobs < 0:
        raise ValueError(f"top_logprobs must be >= 0, got {top_logprobs}")
    tok = ctx.tokenizer
    sampling = sampling or SamplingParams()
    if sampling.seed is None and not sampling.is_greedy:
        sampling = sampling.with_seed(random.getrandbits(63))
    stops = list(stop or [])
    turn = ctx.begin_assistant_turn()  # the template's generation prompt, when the chat awaits a reply
    if turn is not None:
        stops += [s for s in ctx.chat_stop_strings if s not in stops]
    if not seq.pending:
        seq.uncommit_last()
    state = None if constrain is None else bind_constraints(constrain, tok)
    eos = tok.eos_ids
    n_vocab = ctx.engine_info.n_vocab
    decoder = tok.stream_decoder()
    checker = StopChecker(stops)
    gen = Generation(finish_reason="length", prompt_tokens=len(seq))
    computed_before, adopted_before = seq.kv_len, seq.adopted_tokens
    ctx.last = gen
    text_parts: list[str] = []
    finished = False
    try:
        for step in range(max_tokens):
            mask = None if state is None else state.mask()
            # a constrained step reports log p over the allowed tokens too: from the row's logits,
            # unless the mask forces one token
            renormalise = mask is not None and count_allowed(mask) > 1
            out = await seq.submit([], None, None, rows=[len(seq.pending) - 1], samplers=[sampling.for_step(step)],
                                   logit_masks=None if mask is None else mask[None, :],
                                   top_k=0 if mask is not None else top_logprobs, want_logits=renormalise)
            if step == 0:
                gen.cached_tokens = computed_before + seq.adopted_tokens - adopted_before
            token = int(out.tokens[0])
            if state is not None:
                state.advance(token)
            if token in eos:  # not kept in the context
                gen.finish_reason, gen.stop = "stop", tok.decode([token])
                break
            if seq.max_position is not None and seq.next_position > seq.max_position:
                break  # the model's context is full: the token has no position; finish_reason stays "length"
            gen.token_ids.append(token)
            gen.logprobs.append(float(out.logprobs[0]) if out.logprobs is not None else 0.0)
            if mask is not None:
                allowed = mask_to_bool(mask, n_vocab) if renormalise else None
                gen.allowed_logprobs.append(allowed_logprob(out.logits[0], allowed, token) if renormalise else 0.0)
                if top_logprobs:
                    gen.top_logprobs.append(allowed_top(out.logits[0], allowed, top_logprobs) if renormalise
                                            else [(token, 0.0)])
            elif top_logprobs:
                gen.top_logprobs.append([(int(i), math.log(max(float(p), 1e-45)))
                                         for i, p in zip(out.top_ids[0], out.top_probs[0])])
            ctx.fill_tokens([token])
            visible = checker.push(decoder.push(token))
            if visible:
                text_parts.append(visible)
                yield visible
            if checker.stopped:
                gen.finish_reason, gen.stop = "stop", checker.matched
                break
            if state is not None and state.is_done():
                gen.finish_reason = "stop"
                break
        if not checker.stopped:
            rest = checker.push(decoder.flush()) + checker.finish()
            if checker.stopped:
                gen.finish_reason, gen.stop = "stop", checker.matched
            if rest:
                text_parts.append(rest)
                yield rest
        finished = True
    finally:  # also when the caller stops iterating early or the pass fails
        gen.text = "".join(text_parts)
        if not finished:
            gen.finish_reason = "aborted"
        elif checker.stopped:
            _cut_stop_string(ctx, gen, with_top=top_logprobs > 0, constrained=state is not None)
        if turn is not None and not seq.released and not seq.busy:
            ctx.end_assistant_turn(turn, gen.text)


def _cut_stop_string(ctx: Context, gen: Generation, with_top: bool, constrained: bool) -> None:
    """Keep in the context exactly the returned text: drop the tokens of the stop string."""
    tok = ctx.tokenizer
    want = gen.text.encode()
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


async def _stream_with_tools(ctx: Context, sampling: SamplingParams | None, max_tokens: int,
                             stop: Sequence[str] | None, constrain: Any, tools: Sequence[Any], max_tool_calls: int,
                             top_logprobs: int) -> AsyncIterator[str]:
    from pie_local.runtime.tools import as_tools, call_tool

    tools = as_tools(tools)
    if not ctx.messages:
        raise ValueError("generate(tools=...) needs a chat context: add messages with ctx.system()/ctx.user() first")
    ctx.set_tools([t.schema for t in tools])
    calls_made: list[Any] = []
    for round_ in range(max_tool_calls + 1):
        async with contextlib.aclosing(_stream_once(ctx, sampling, max_tokens, stop, constrain,
                                                    top_logprobs)) as pieces:
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
