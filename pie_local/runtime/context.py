"""Context: a token sequence with its KV pages, the object inferlets program against.

Tokens are either *committed* (their KV is in the context's pages) or *pending* (filled, not yet
computed: the next forward pass computes them). Full pages may be shared with other contexts
(forks, prefix cache); the tail page is copied before it is written when it is shared
(copy-on-write), so `fork()` costs no copy up front.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

import numpy as np

from pie_local.runtime.forward import Forward, ForwardOutput, ForwardRequest
from pie_local.runtime.limits import ContextBusyError
from pie_local.runtime.pages import Page
from pie_local.runtime.sampling import SamplingParams, StopChecker

if TYPE_CHECKING:
    from pie_local.runtime.engine import Engine


_RESERVED = object()  # marks a context busy before its request exists


@dataclass
class Generation:
    """What the last generate()/stream() of a context produced."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log p of each of token_ids (nan: not sampled)
    finish_reason: str = ""  # "stop" (EOS, stop string, constraint done), "length", "aborted" (stream left early)
    stop: str | None = None  # the stop string or EOS token text that ended it
    tool_calls: list[Any] = field(default_factory=list)


class Context:
    """Create with ``rt.context()`` (inside an inferlet) or ``engine.context()``."""

    def __init__(self, engine: Engine, owner: Any = None) -> None:
        self._engine = engine
        self._owner = owner
        self._pool = engine._pool
        self._ps = engine._pool.page_size
        self._committed: list[int] = []
        self._positions: list[int] = []  # of committed tokens
        self._pending: list[int] = []
        self._pending_pos: list[int] = []
        self._pages: list[Page] = []
        self._hashes: list[bytes] = []  # content address of each full page while canonical
        self._canonical = True  # positions == KV index and plain causal attention so far
        self._inflight: ForwardRequest | None = None
        self._released = False
        self._messages: list[dict] = []
        self._message_ends: list[int] = []  # len(self) after each message was filled
        self._rendered = ""  # the chat template's text of _messages (no generation prompt)
        self._chat_start = 0  # len(self) before the first message
        self._tools: list[dict] | None = None  # tool schemas the template renders
        self.last: Generation = Generation()
        if owner is not None:
            owner.contexts.add(self)

    # ---- views ---------------------------------------------------------------------------------

    @property
    def token_ids(self) -> list[int]:
        return self._committed + self._pending

    def __len__(self) -> int:
        return len(self._committed) + len(self._pending)

    @property
    def kv_len(self) -> int:
        """Tokens whose KV is computed."""
        return len(self._committed)

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    @property
    def n_pages(self) -> int:
        return len(self._pages)

    @property
    def page_ids(self) -> list[int]:
        return [p.id for p in self._pages]

    @property
    def next_position(self) -> int:
        if self._pending_pos:
            return self._pending_pos[-1] + 1
        return self._positions[-1] + 1 if self._positions else 0

    @property
    def messages(self) -> list[dict]:
        return list(self._messages)

    @property
    def text(self) -> str:
        return self._engine.tokenizer.decode(self.token_ids)

    @property
    def engine_info(self):
        return self._engine.info

    @property
    def tokenizer(self):
        return self._engine.tokenizer

    def __repr__(self) -> str:
        return f"Context(tokens={len(self)}, pending={len(self._pending)}, pages={len(self._pages)})"

    # ---- filling -------------------------------------------------------------------------------

    def fill(self, text: str) -> Context:
        """Append text (special tokens such as <start_of_turn> are parsed). Computed at the next pass."""
        tok = self._engine.tokenizer
        ids = tok.encode(text, add_special=False, parse_special=True)
        if len(self) == 0 and tok.add_bos and tok.bos_id is not None and ids[:1] != [tok.bos_id]:
            ids = [tok.bos_id] + ids
        return self.fill_tokens(ids)

    def fill_tokens(self, ids: Sequence[int]) -> Context:
        self._check_alive()
        n_vocab = self._engine.info.n_vocab
        ids = [int(t) for t in ids]
        for t in ids:
            if not 0 <= t < n_vocab:
                raise ValueError(f"token id {t} out of range [0, {n_vocab})")
        start = self.next_position
        self._pending += ids
        self._pending_pos += range(start, start + len(ids))
        return self

    def system(self, text: str) -> Context:
        return self._add_message({"role": "system", "content": text})

    def user(self, text: str) -> Context:
        return self._add_message({"role": "user", "content": text})

    def assistant(self, text: str) -> Context:
        return self._add_message({"role": "assistant", "content": text})

    def set_tools(self, tools: list[dict] | None) -> None:
        """The tool schemas the chat template offers the model. Changing them after messages were
        filled re-renders the conversation (full pages that still match come from the prefix cache)."""
        tools = tools or None
        if tools == self._tools:
            return
        self._tools = tools
        if self._messages:
            self._sync_chat(self._render(self._messages), list(self._messages))

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self._engine.chat_template.render(messages, add_generation_prompt=add_generation_prompt,
                                                 tools=self._tools)

    def _add_message(self, message: dict) -> Context:
        if not self._messages:
            self._chat_start = len(self)
        messages = self._messages + [message]
        self._sync_chat(self._render(messages), messages)
        return self

    def _sync_chat(self, rendered: str, messages: list[dict], refill: bool = False) -> None:
        """Make the context hold ``rendered`` (the template's text of ``messages``) after its chat start:
        append the new part, or, when the template rewrote earlier turns, refill the conversation."""
        if not refill and rendered.startswith(self._rendered):
            self.fill(rendered[len(self._rendered):])
            self._message_ends += [len(self)] * (len(messages) - len(self._messages))
        else:
            self._check_idle("re-render the conversation")
            self._truncate_kv(self._chat_start)
            self.fill(rendered)
            self._message_ends = [len(self)] * len(messages)
        self._messages, self._rendered = messages, rendered

    # ---- forward passes --------------------------------------------------------------------------

    async def flush(self) -> None:
        """Compute the KV of every pending token."""
        if self._pending:
            await self._submit([], None, None, rows=[], samplers=[])

    def forward(self) -> Forward:
        """A low-level forward pass over this context (pending tokens are computed first)."""
        self._check_alive()
        return Forward(self)

    def _default_positions(self, n: int) -> list[int]:
        start = self.next_position
        return list(range(start, start + n))

    async def _run_forward(self, tokens: list[int], positions: list[int] | None, masks, rows: list[int],
                           samplers: list, *, logit_masks=None, top_k: int = 0, want_logits: bool = False,
                           entropy: bool = False, keep_logits: bool = False) -> ForwardOutput:
        """Forward.execute(): rows index ``tokens``; pending tokens go first in the same pass."""
        offset = len(self._pending)
        out = await self._submit(tokens, positions, masks, [offset + r for r in rows], samplers,
                                 logit_masks=logit_masks, top_k=top_k, want_logits=want_logits,
                                 entropy=entropy)
        out.rows = [r - offset for r in out.rows]
        if not keep_logits:
            out.logits = None
        return out

    async def _submit(self, tokens: list[int], positions: list[int] | None, masks, rows: list[int],
                      samplers: list, *, logit_masks=None, top_k: int = 0, want_logits: bool = False,
                      entropy: bool = False) -> ForwardOutput:
        """Compute pending + ``tokens``; ``rows`` index that concatenation. Commits on success."""
        self._check_alive()
        if self._inflight is not None:
            raise ContextBusyError("this context already has a forward pass running; await it first")
        engine = self._engine
        n_pend = len(self._pending)
        todo = self._pending + [int(t) for t in tokens]
        todo_pos = self._pending_pos + (positions if positions is not None else
                                        list(range(self.next_position, self.next_position + len(tokens))))
        todo_masks = None if masks is None else [None] * n_pend + list(masks)
        if not todo:
            raise ValueError("nothing to compute: fill the context first")
        for t in tokens:
            if not 0 <= t < engine.info.n_vocab:
                raise ValueError(f"token id {t} out of range [0, {engine.info.n_vocab})")
        kv0 = len(self._committed)
        if masks is not None:
            for i, runs in enumerate(masks):
                if runs is not None and (min(runs, default=0) < 0 or sum(runs) != kv0 + len(todo)):
                    raise ValueError(f"mask of input {i}: runs must be >= 0 and sum to {kv0 + len(todo)} "
                                     f"(the context's KV length after this pass), got {runs}")
        if any(p < 0 for p in todo_pos):
            raise ValueError("positions must be >= 0")
        natural = todo_masks is None and todo_pos == list(range(kv0, kv0 + len(todo)))
        self._inflight = _RESERVED  # the context is busy while we may wait for shared pages
        try:
            skipped = 0
            if self._canonical and natural:
                limit = min(rows) if rows else len(todo)  # todo's first row whose logits are wanted
                if (len(self._hashes) + 1) * self._ps <= kv0 + limit:  # a full page to look up
                    skipped = await self._adopt_prefix(todo, limit)
                    self._check_alive()
                if len(todo) > 1:  # prompt-like passes; single decode tokens cannot hit
                    engine._counters.record_prefix(len(todo), skipped)
            if skipped:
                n_used = min(skipped, n_pend)
                self._pending, self._pending_pos = self._pending[n_used:], self._pending_pos[n_used:]
                n_pend -= n_used
                todo, todo_pos = todo[skipped:], todo_pos[skipped:]
                rows = [r - skipped for r in rows]
            if not todo:
                return ForwardOutput(rows=[], tokens=np.zeros(0, np.int32))
            req = self._plan(todo, todo_pos, todo_masks, n_pend, natural, rows, samplers,
                             logit_masks, top_k, want_logits, entropy)
            self._inflight = req
            fut = engine._scheduler.submit(req)
            try:
                out = await fut
            except asyncio.CancelledError:
                engine._scheduler.cancel(req)
                raise
            out.rows = [r + skipped for r in out.rows]
            return out
        finally:
            self._inflight = None

    async def _adopt_prefix(self, todo: list[int], limit: int) -> int:
        """Adopt computed pages of the prefix index for the leading full pages of ``todo``
        (never past index ``limit`` of todo, whose logits are wanted). Returns tokens adopted.
        The caller checked that at least one full page lies before ``limit`` (never on a decode step)."""
        ps, pool = self._ps, self._pool
        kv0 = len(self._committed)
        tokens = self._committed + todo
        while True:
            matches: list[tuple[int, Page, bytes]] = []
            prev = self._hashes[-1] if self._hashes else None
            i = len(self._hashes)
            waiting = False
            while (i + 1) * ps <= kv0 + limit:
                key = pool.chain_hash(prev, tokens[i * ps : (i + 1) * ps])
                page = pool.lookup(key)
                if page is None:
                    break
                if not page.ready:
                    waiting = True
                    break
                matches.append((i, page, key))
                prev, i = key, i + 1
            if not waiting:
                break
            await pool.wait_change()  # the page is being computed by another pass; then retry
        if not matches:
            return 0
        for i, page, key in matches:
            pool.incref(page)
            if i < len(self._pages):  # our partial tail holds the same tokens: use the shared page
                self._release_pages([self._pages[i]])
                self._pages[i] = page
            else:
                self._pages.append(page)
            self._hashes.append(key)
        end = (matches[-1][0] + 1) * ps
        self._committed = tokens[:end]
        self._positions = list(range(end))
        return end - kv0

    def _plan(self, todo, todo_pos, todo_masks, n_pend, natural, rows, samplers, logit_masks, top_k,
              want_logits, entropy) -> ForwardRequest:
        """Pages, copy-on-write and content addresses of one pass; callbacks to commit or undo it."""
        ps, pool, owner = self._ps, self._pool, self._owner
        kv0 = len(self._committed)
        kv1 = kv0 + len(todo)
        pages = list(self._pages)
        cow = bool(kv0 % ps) and not pages[-1].writable
        n_alloc = int(cow) + -(-kv1 // ps) - len(pages)
        # new pages go right after the ones they extend: the driver reads consecutive pages as one slice
        extends = pages[:-1] if cow else pages
        fresh = pool.allocate(n_alloc, after=extends[-1] if extends else None)
        if owner is not None:
            try:
                owner.charge(tokens=len(todo), new_pages=n_alloc)
            except BaseException:
                pool.release(fresh)
                raise
        copies, dropped = [], []
        if cow:
            copies.append((pages[-1].id, fresh[0].id))
            dropped.append(pages[-1])
            pages[-1] = fresh[0]
            pages += fresh[1:]
        else:
            pages += fresh
        keep_canonical = self._canonical and natural
        new_hashes: list[bytes] = []
        registered: list[tuple[Page, int]] = []
        if keep_canonical and len(self._hashes) < kv1 // ps:
            tokens = self._committed[len(self._hashes) * ps:] + todo  # from the first unhashed page on
            base = len(self._hashes) * ps
            prev = self._hashes[-1] if self._hashes else None
            for i in range(len(self._hashes), kv1 // ps):
                prev = pool.chain_hash(prev, tokens[i * ps - base : (i + 1) * ps - base])
                new_hashes.append(prev)
                if pool.register(pages[i], prev, ready=False):
                    registered.append((pages[i], (i + 1) * ps))

        def on_chunk(kv_done: int) -> None:
            for page, end in registered:
                if end <= kv_done and not page.ready:
                    pool.mark_ready(page)

        def on_complete(req: ForwardRequest) -> ForwardOutput:  # gets req: no reference cycle
            self._committed += todo
            self._positions += todo_pos
            self._pending, self._pending_pos = self._pending[n_pend:], self._pending_pos[n_pend:]
            self._pages = pages
            if keep_canonical:
                self._hashes += new_hashes
            else:
                self._canonical = False
                self._hashes = []
            self._release_pages(dropped)
            return req.output(entropy)

        def on_abort() -> None:
            pool.release(fresh)
            pool.notify()

        return ForwardRequest(
            tokens=np.asarray(todo, dtype=np.int32), positions=np.asarray(todo_pos, dtype=np.int32),
            masks=todo_masks, kv_before=kv0, pages=[p.id for p in pages], output_rows=list(rows),
            samplers=list(samplers), logit_masks=logit_masks, top_k=top_k, want_logits=want_logits,
            copies=copies, owner=owner, context=self, on_chunk=on_chunk if registered else None,
            on_complete=on_complete, on_abort=on_abort,
        )

    # ---- generation ------------------------------------------------------------------------------

    async def generate(self, sampling: SamplingParams | None = None, max_tokens: int = 256,
                       stop: Sequence[str] | None = None, constrain: Any = None, tools: Any = None,
                       max_tool_calls: int = 8) -> str:
        """Generate text. Stops at an end-of-generation token, a stop string, when a constraint is
        complete, or after ``max_tokens``. ``ctx.last`` tells which, and holds the token ids."""
        parts = [piece async for piece in self.stream(sampling, max_tokens, stop, constrain, tools, max_tool_calls)]
        return "".join(parts)

    async def stream(self, sampling: SamplingParams | None = None, max_tokens: int = 256,
                     stop: Sequence[str] | None = None, constrain: Any = None, tools: Any = None,
                     max_tool_calls: int = 8) -> AsyncIterator[str]:
        """Like generate(), yielding text pieces as they are decoded (stop strings held back)."""
        if tools:
            from pie_local.runtime.toolloop import run_with_tools

            pieces = run_with_tools(self, sampling, max_tokens, stop, constrain, tools, max_tool_calls)
        else:
            pieces = self._stream_once(sampling, max_tokens, stop, constrain)
        async with contextlib.aclosing(pieces):  # leaving early finalizes the generation now
            async for piece in pieces:
                yield piece

    async def _stream_once(self, sampling: SamplingParams | None, max_tokens: int, stop: Sequence[str] | None,
                           constrain: Any) -> AsyncIterator[str]:
        self._check_alive()
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        engine = self._engine
        tok = engine.tokenizer
        sampling = sampling or SamplingParams()
        if sampling.seed is None and not sampling.is_greedy:
            sampling = sampling.with_seed(random.getrandbits(63))
        stops = list(stop or [])
        chat_turn = bool(self._messages) and self._messages[-1]["role"] != "assistant"
        prompt_text = ""
        if chat_turn:
            prompt_text = self._render(self._messages, add_generation_prompt=True)
            self.fill(prompt_text[len(self._rendered):])
            stops += [s for s in engine.chat_template.stop_strings if s not in stops]
        if not self._pending:
            self._uncommit_last()
        state = None if constrain is None else _bind_constraints(constrain, tok)
        eos = tok.eos_ids
        decoder = tok.stream_decoder()
        checker = StopChecker(stops)
        gen = Generation(finish_reason="length")
        self.last = gen
        text_parts: list[str] = []
        finished = False
        try:
            for step in range(max_tokens):
                mask = None if state is None else state.mask()[None, :]
                out = await self._submit([], None, None, rows=[len(self._pending) - 1],
                                         samplers=[sampling.to_driver(step)], logit_masks=mask)
                token = int(out.tokens[0])
                if state is not None:
                    state.advance(token)
                if token in eos:  # not kept in the context
                    gen.finish_reason, gen.stop = "stop", tok.decode([token])
                    break
                gen.token_ids.append(token)
                gen.logprobs.append(float(out.logprobs[0]) if out.logprobs is not None else 0.0)
                self.fill_tokens([token])
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
                self._cut_stop_string(gen)
            if chat_turn and not self._released and self._inflight is None:
                self._close_assistant_turn(prompt_text, gen.text)

    def _cut_stop_string(self, gen: Generation) -> None:
        """Keep in the context exactly the returned text: drop the tokens of the stop string."""
        tok = self._engine.tokenizer
        want = gen.text.encode()
        kept, size = 0, 0
        for t in gen.token_ids:
            piece = tok.piece(t, special=False)
            if size + len(piece) > len(want) or want[size : size + len(piece)] != piece:
                break
            kept, size = kept + 1, size + len(piece)
        self._truncate_kv(len(self) - (len(gen.token_ids) - kept))
        gen.token_ids, gen.logprobs = gen.token_ids[:kept], gen.logprobs[:kept]
        leftover = want[size:].decode("utf-8", errors="ignore")
        if leftover:
            ids = tok.encode(leftover, add_special=False, parse_special=False)
            self.fill_tokens(ids)
            gen.token_ids += ids
            gen.logprobs += [float("nan")] * len(ids)  # re-encoded text, not sampled

    def _close_assistant_turn(self, prompt_text: str, text: str) -> None:
        """Record the reply as an assistant message and fill the template's end of turn. When the
        template renders the reply differently from what was generated (stripped whitespace,
        dropped reasoning), the conversation is refilled as the template has it."""
        messages = self._messages + [{"role": "assistant", "content": text}]
        rendered = self._render(messages)
        in_kv = prompt_text + text
        if rendered.startswith(in_kv):
            self.fill(rendered[len(in_kv):])
            self._message_ends.append(len(self))
            self._messages, self._rendered = messages, rendered
        else:
            self._sync_chat(rendered, messages, refill=True)

    def _uncommit_last(self) -> None:
        """Move the last committed token back to pending, to get the logits that follow it."""
        if not self._committed:
            raise ValueError("the context is empty: fill() something before generate()")
        token, pos = self._committed[-1], self._positions[-1]
        pending, pending_pos = self._pending, self._pending_pos
        self._truncate_kv(len(self._committed) - 1)
        self._pending, self._pending_pos = [token] + pending, [pos] + pending_pos

    # ---- structure -------------------------------------------------------------------------------

    def fork(self, n: int = 1) -> Context | list[Context]:
        """``n`` independent copies sharing this context's pages (copy-on-write). O(pages)."""
        self._check_alive()
        self._check_idle("fork")
        if n < 1:
            raise ValueError(f"fork(n) needs n >= 1, got {n}")
        if self._owner is not None:
            self._owner.charge(tokens=0, new_pages=n * len(self._pages))
        children = []
        for _ in range(n):
            child = Context(self._engine, self._owner)
            child._committed, child._positions = list(self._committed), list(self._positions)
            child._pending, child._pending_pos = list(self._pending), list(self._pending_pos)
            child._pages, child._hashes = list(self._pages), list(self._hashes)
            child._canonical = self._canonical
            child._messages, child._message_ends = list(self._messages), list(self._message_ends)
            child._rendered, child._chat_start, child._tools = self._rendered, self._chat_start, self._tools
            for page in self._pages:
                self._pool.incref(page)
            children.append(child)
        return children[0] if n == 1 else children

    def truncate(self, n_tokens: int) -> None:
        """Keep the first ``n_tokens`` tokens."""
        self._check_alive()
        self._check_idle("truncate")
        if not 0 <= n_tokens <= len(self):
            raise ValueError(f"truncate({n_tokens}) outside 0..{len(self)}")
        self._truncate_kv(n_tokens)
        while self._message_ends and self._message_ends[-1] > n_tokens:
            self._message_ends.pop()
            self._messages.pop()
        if self._messages or self._rendered:
            self._rendered = self._render(self._messages) if self._messages else ""

    def _truncate_kv(self, n_tokens: int) -> None:
        kv = len(self._committed)
        if n_tokens >= kv:
            keep = n_tokens - kv
            self._pending, self._pending_pos = self._pending[:keep], self._pending_pos[:keep]
        else:
            self._pending, self._pending_pos = [], []
            self._committed, self._positions = self._committed[:n_tokens], self._positions[:n_tokens]
            n_keep = -(-n_tokens // self._ps)
            self._release_pages(self._pages[n_keep:])
            self._pages = self._pages[:n_keep]
            self._hashes = self._hashes[: n_tokens // self._ps]

    def drop_pages(self, indices: Sequence[int]) -> None:
        """Remove whole full pages (by index in this context) from the KV: their tokens are gone,
        later tokens keep their positions (attention sinks, windowed attention)."""
        self._check_alive()
        self._check_idle("drop pages")
        ps = self._ps
        n_full = len(self._committed) // ps
        drop = sorted(set(int(i) for i in indices))
        for i in drop:
            if not 0 <= i < n_full:
                raise ValueError(f"page {i} is not a full page of this context (it has {n_full})")
        if not drop:
            return
        keep = [i for i in range(len(self._pages)) if i not in set(drop)]
        self._release_pages([self._pages[i] for i in drop])
        tok_keep = [j for j in range(len(self._committed)) if j // ps not in set(drop)]
        self._committed = [self._committed[j] for j in tok_keep]
        self._positions = [self._positions[j] for j in tok_keep]
        self._pages = [self._pages[i] for i in keep]
        self._canonical, self._hashes = False, []
        self._messages, self._message_ends, self._rendered = [], [], ""

    # ---- snapshots -------------------------------------------------------------------------------

    async def save(self, name: str) -> Any:
        """Write this context (tokens + KV pages) as the named snapshot; survives restarts."""
        from pie_local.runtime import snapshots

        return await snapshots.save(self, name)

    @classmethod
    async def open(cls, rt: Any, name: str) -> Context:
        """Load a named snapshot into a new context of ``rt`` (a Runtime or an Engine)."""
        from pie_local.runtime import snapshots

        return await snapshots.load(rt, name)

    # ---- lifetime --------------------------------------------------------------------------------

    def release(self) -> None:
        """Give back this context's pages (also happens when its inferlet ends)."""
        if self._released:
            return
        if isinstance(self._inflight, ForwardRequest):
            self._engine._scheduler.cancel(self._inflight)
        self._released = True
        self._release_pages(self._pages)
        self._pages, self._hashes = [], []
        if self._owner is not None:
            self._owner.contexts.discard(self)

    def _release_pages(self, pages: Sequence[Page]) -> None:
        self._pool.release(pages)

    def _check_idle(self, action: str) -> None:
        if self._inflight is not None:
            raise ContextBusyError(f"cannot {action} while a forward pass of this context is running")

    def _check_alive(self) -> None:
        if self._released:
            raise RuntimeError("this context was released")


def _bind_constraints(constrain: Any, tokenizer: Any) -> Any:
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
