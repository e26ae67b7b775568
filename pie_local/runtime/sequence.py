"""Sequence: the bookkeeping under a Context — its tokens, positions and KV pages, prefix adoption,
and how one forward pass over them is planned.

Tokens are either *committed* (their KV is in the sequence's pages) or *pending* (filled, not yet
computed: the next pass computes them first). Full pages may be shared with other sequences
(forks, the prefix cache); the tail page is copied before it is written when it is shared
(copy-on-write), so forking costs no copy up front.

A sequence is *canonical* while its tokens sit at their natural positions under plain causal
attention: only then do its full pages have content addresses (a chain hash of the tokens), so
that identical prefixes are computed once and shared. An embedding model's sequence never is: its
attention is bidirectional, so a page's KV depends on every token of the input, and the input is
computed whole in one pass (check_one_pass).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Sequence as Seq

import numpy as np

from pie_local.driver.types import SamplingParams
from pie_local.runtime.forward import ForwardOutput, ForwardRequest
from pie_local.runtime.limits import ContextBusyError, ContextLengthError
from pie_local.runtime.pages import Page

if TYPE_CHECKING:
    from pie_local.runtime.engine import Engine

_RESERVED = object()  # marks a sequence busy before its request exists


class Sequence:
    def __init__(self, engine: Engine, owner: Any = None) -> None:
        self.engine = engine
        self.owner = owner  # the inferlet charged for its tokens and pages (None: the caller owns it)
        self.pool = engine.pool
        self.page_size = engine.pool.page_size
        self.committed: list[int] = []
        self.positions: list[int] = []  # of committed tokens
        self.pending: list[int] = []
        self.pending_positions: list[int] = []
        self.pages: list[Page] = []
        self.hashes: list[bytes] = []  # content address of each full page while canonical
        self.canonical = not engine.info.embedding_only
        self.adopted_tokens = 0  # tokens taken from the prefix cache instead of computed, in all
        n_ctx = engine.info.n_ctx_train
        # the last position the model was trained for; None: the program keeps attention in range
        # itself (attention sinks, sliding windows) and may go past it
        self.max_position: int | None = n_ctx - 1 if n_ctx > 0 else None
        self.released = False
        self._inflight: Any = None  # the ForwardRequest being computed (or _RESERVED)

    # ---- views ---------------------------------------------------------------------------------

    @property
    def tokens(self) -> list[int]:
        return self.committed + self.pending

    def __len__(self) -> int:
        return len(self.committed) + len(self.pending)

    @property
    def kv_len(self) -> int:
        return len(self.committed)

    @property
    def busy(self) -> bool:
        return self._inflight is not None

    @property
    def next_position(self) -> int:
        if self.pending_positions:
            return self.pending_positions[-1] + 1
        return self.positions[-1] + 1 if self.positions else 0

    def check_one_pass(self, n_tokens: int) -> None:
        """An embedding model computes an input whole, in one pass of at most max_batch_tokens, on an
        empty sequence (no-op for other models)."""
        info = self.engine.info
        if not info.embedding_only:
            return
        if self.committed:
            raise ValueError(f"{info.arch} is an embedding model: its attention is bidirectional, so an input is "
                             "computed whole in one pass and cannot be extended")
        if n_tokens > info.max_batch_tokens:
            raise ValueError(f"the input has {n_tokens} tokens; an embedding model computes an input in one pass of "
                             f"at most max_batch_tokens ({info.max_batch_tokens}): shorten it or load the model "
                             "with a larger max_batch_tokens")

    def check_alive(self) -> None:
        if self.released:
            raise RuntimeError("this context was released")

    def check_idle(self, action: str) -> None:
        if self._inflight is not None:
            raise ContextBusyError(f"cannot {action} while a forward pass of this context is running")

    # ---- editing -------------------------------------------------------------------------------

    def check_positions(self, last: int) -> None:
        if self.max_position is not None and last > self.max_position:
            n_ctx = self.max_position + 1
            raise ContextLengthError(
                f"position {last} is past the model's trained context of {n_ctx} tokens (positions 0..{n_ctx - 1}); "
                "shorten the input, or set ctx.max_position = None if the program keeps attention in range "
                "itself (attention sink, sliding window)")

    def append(self, ids: Seq[int]) -> None:
        """Pending tokens at the next natural positions (ids already checked)."""
        start = self.next_position
        if ids:
            self.check_positions(start + len(ids) - 1)
        self.pending += ids
        self.pending_positions += range(start, start + len(ids))

    def truncate(self, n_tokens: int) -> None:
        """Keep the first ``n_tokens`` tokens (committed ones first), releasing pages past them."""
        kv = len(self.committed)
        if n_tokens >= kv:
            keep = n_tokens - kv
            self.pending, self.pending_positions = self.pending[:keep], self.pending_positions[:keep]
            return
        self.pending, self.pending_positions = [], []
        self.committed, self.positions = self.committed[:n_tokens], self.positions[:n_tokens]
        n_keep = -(-n_tokens // self.page_size)
        self.pool.release(self.pages[n_keep:])
        self.pages = self.pages[:n_keep]
        self.hashes = self.hashes[: n_tokens // self.page_size]

    def uncommit_last(self) -> None:
        """Move the last committed token back to pending, to get the logits that follow it."""
        if not self.committed:
            raise ValueError("the context is empty: fill() something before generate()")
        token, pos = self.committed[-1], self.positions[-1]
        pending, pending_pos = self.pending, self.pending_positions
        self.truncate(len(self.committed) - 1)
        self.pending, self.pending_positions = [token] + pending, [pos] + pending_pos

    def drop_pages(self, indices: Seq[int]) -> bool:
        """Remove whole full pages from the KV; later tokens keep their positions. True if any went."""
        ps = self.page_size
        n_full = len(self.committed) // ps
        drop = set(int(i) for i in indices)
        for i in sorted(drop):
            if not 0 <= i < n_full:
                raise ValueError(f"page {i} is not a full page of this context (it has {n_full})")
        if not drop:
            return False
        self.pool.release([self.pages[i] for i in sorted(drop)])
        keep_tokens = [j for j in range(len(self.committed)) if j // ps not in drop]
        self.committed = [self.committed[j] for j in keep_tokens]
        self.positions = [self.positions[j] for j in keep_tokens]
        self.pages = [p for i, p in enumerate(self.pages) if i not in drop]
        self.canonical, self.hashes = False, []
        return True

    def fork(self, owner: Any) -> Sequence:
        """A copy sharing every page (refcounted; the shared tail is copied on its next write)."""
        child = Sequence(self.engine, owner)
        child.committed, child.positions = list(self.committed), list(self.positions)
        child.pending, child.pending_positions = list(self.pending), list(self.pending_positions)
        child.pages, child.hashes, child.canonical = list(self.pages), list(self.hashes), self.canonical
        child.max_position = self.max_position
        for page in self.pages:
            self.pool.incref(page)
        return child

    def restore(self, pages: list[Page], committed: list[int], positions: list[int], pending: list[int],
                pending_positions: list[int], canonical: bool) -> None:
        """Take over pages whose KV was written back from a snapshot; index them when canonical."""
        self.pages = pages
        self.committed, self.positions = list(committed), list(positions)
        self.pending, self.pending_positions = list(pending), list(pending_positions)
        self.canonical, self.hashes = canonical, []
        if canonical:  # so that other contexts can share the restored prefix
            ps, prev = self.page_size, None
            for i in range(len(committed) // ps):
                prev = self.pool.chain_hash(prev, committed[i * ps : (i + 1) * ps])
                self.hashes.append(prev)
                self.pool.register(pages[i], prev, ready=True)

    def release(self) -> None:
        if self.released:
            return
        if isinstance(self._inflight, ForwardRequest):
            self.engine.cancel(self._inflight)
        self.released = True
        self.pool.release(self.pages)
        self.pages, self.hashes = [], []

    # ---- forward passes ------------------------------------------------------------------------

    async def submit(self, tokens: list[int], positions: list[int] | None, masks: list | None, rows: list[int],
                     samplers: list[SamplingParams], *, logit_masks: np.ndarray | None = None, top_k: int = 0,
                     want_logits: bool = False, want_hidden: bool = False,
                     hidden_only: bool = False) -> ForwardOutput:
        """Compute pending + ``tokens``; ``rows`` index that concatenation. Commits on success."""
        self.check_alive()
        if self._inflight is not None:
            raise ContextBusyError("this context already has a forward pass running; await it first")
        n_vocab = self.engine.info.n_vocab
        if self.engine.info.embedding_only and not hidden_only:
            raise ValueError(f"{self.engine.info.arch} is an embedding model: it has no LM head, so it cannot "
                             "generate or score text; use its embeddings (embed, /v1/embeddings)")
        n_pend = len(self.pending)
        todo = self.pending + [int(t) for t in tokens]
        todo_pos = self.pending_positions + (positions if positions is not None else
                                             list(range(self.next_position, self.next_position + len(tokens))))
        todo_masks = None if masks is None else [None] * n_pend + list(masks)
        if not todo:
            raise ValueError("nothing to compute: fill the context first")
        for t in tokens:
            if not 0 <= t < n_vocab:
                raise ValueError(f"token id {t} out of range [0, {n_vocab})")
        kv0 = len(self.committed)
        if masks is not None:
            for i, runs in enumerate(masks):
                if runs is not None and (min(runs, default=0) < 0 or sum(runs) != kv0 + len(todo)):
                    raise ValueError(f"mask of input {i}: runs must be >= 0 and sum to {kv0 + len(todo)} "
                                     f"(the context's KV length after this pass), got {runs}")
        if any(p < 0 for p in todo_pos):
            raise ValueError("positions must be >= 0")
        self.check_positions(max(todo_pos))
        self.check_one_pass(len(todo))
        natural = todo_masks is None and todo_pos == list(range(kv0, kv0 + len(todo)))
        self._inflight = _RESERVED  # busy while we may wait for shared pages
        try:
            skipped = 0
            if self.canonical and natural:
                limit = min(rows) if rows else len(todo)  # todo's first row whose logits are wanted
                if (len(self.hashes) + 1) * self.page_size <= kv0 + limit:  # a full page to look up
                    skipped = await self._adopt_prefix(todo, limit)
                    self.check_alive()
                if len(todo) > 1:  # prompt-like passes; single decode tokens cannot hit
                    self.engine.counters.record_prefix(len(todo), skipped)
            if skipped:
                n_used = min(skipped, n_pend)
                self.pending, self.pending_positions = self.pending[n_used:], self.pending_positions[n_used:]
                n_pend -= n_used
                todo, todo_pos = todo[skipped:], todo_pos[skipped:]
                rows = [r - skipped for r in rows]
            if not todo:
                return ForwardOutput(rows=[], tokens=np.zeros(0, np.int32))
            req = self._plan(todo, todo_pos, todo_masks, n_pend, natural, rows, samplers,
                             logit_masks, top_k, want_logits)
            req.want_hidden, req.hidden_only = want_hidden or hidden_only, hidden_only
            req.whole = self.engine.info.embedding_only
            self._inflight = req
            fut = self.engine.submit(req)
            try:
                out = await fut
            except asyncio.CancelledError:
                self.engine.cancel(req)
                raise
            out.rows = [r + skipped for r in out.rows]
            return out
        finally:
            self._inflight = None

    async def _adopt_prefix(self, todo: list[int], limit: int) -> int:
        """Adopt computed pages of the prefix index for the leading full pages of ``todo``
        (never past index ``limit`` of todo, whose logits are wanted). Returns tokens adopted.
        The caller checked that at least one full page lies before ``limit`` (never on a decode step)."""
        ps, pool = self.page_size, self.pool
        kv0 = len(self.committed)
        tokens = self.committed + todo
        while True:
            matches: list[tuple[int, Page, bytes]] = []
            prev = self.hashes[-1] if self.hashes else None
            i = len(self.hashes)
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
            if i < len(self.pages):  # our partial tail holds the same tokens: use the shared page
                pool.release([self.pages[i]])
                self.pages[i] = page
            else:
                self.pages.append(page)
            self.hashes.append(key)
        end = (matches[-1][0] + 1) * ps
        self.committed = tokens[:end]
        self.positions = list(range(end))
        self.adopted_tokens += end - kv0
        return end - kv0

    def _plan(self, todo, todo_pos, todo_masks, n_pend, natural, rows, samplers, logit_masks, top_k,
              want_logits) -> ForwardRequest:
        """Pages, copy-on-write and content addresses of one pass; callbacks to commit or undo it."""
        ps, pool, owner = self.page_size, self.pool, self.owner
        kv0 = len(self.committed)
        kv1 = kv0 + len(todo)
        pages = list(self.pages)
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
        keep_canonical = self.canonical and natural
        new_hashes: list[bytes] = []
        registered: list[tuple[Page, int]] = []
        if keep_canonical and len(self.hashes) < kv1 // ps:
            tokens = self.committed[len(self.hashes) * ps:] + todo  # from the first unhashed page on
            base = len(self.hashes) * ps
            prev = self.hashes[-1] if self.hashes else None
            for i in range(len(self.hashes), kv1 // ps):
                prev = pool.chain_hash(prev, tokens[i * ps - base : (i + 1) * ps - base])
                new_hashes.append(prev)
                if pool.register(pages[i], prev, ready=False):
                    registered.append((pages[i], (i + 1) * ps))

        def on_chunk(kv_done: int) -> None:
            for page, end in registered:
                if end <= kv_done and not page.ready:
                    pool.mark_ready(page)

        def on_complete(_output: ForwardOutput) -> None:
            if self.released:  # released while the pass ran: its own pages went then, these go now
                pool.release(fresh)
                return
            self.committed += todo
            self.positions += todo_pos
            self.pending, self.pending_positions = self.pending[n_pend:], self.pending_positions[n_pend:]
            self.pages = pages
            if keep_canonical:
                self.hashes += new_hashes
            else:
                self.canonical = False
                self.hashes = []
            pool.release(dropped)

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
