"""The batch scheduler: every inferlet's forward requests, one driver call at a time.

Work-conserving: a batch fires as soon as the previous one is done and something is queued;
one batch is in flight; the driver call runs on a dedicated driver thread (the ctypes call
releases the GIL), so inferlet code keeps running while the model computes. Decode-sized
requests go first; long prefills are split into chunks that fill the rest of the token budget,
so decoders are never starved by a long prompt. Page operations (copy, read, write) go through
the same thread so they are ordered with the forward passes.

The scheduler is driven by callbacks, not a task: a finished batch comes back to the event loop
in one `call_soon_threadsafe`, which resolves every request of the batch and, a few loop turns
later (once the woken inferlets have queued their next step), fires the next batch. A decode
step thus costs two thread wake-ups and about two event-loop turns.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pie_local.driver.types import DriverError, ForwardBatch, ForwardResult, ModelDriver
from pie_local.driver import brle
from pie_local.runtime.forward import ForwardOutput, ForwardRequest
from pie_local.runtime.stats import Counters

log = logging.getLogger("pie_local.runtime")

DECODE_TOKENS = 16  # requests this small are scheduled first (decode steps, draft verification)
YIELDS_AFTER_BATCH = 4  # event-loop turns given to woken inferlets to queue their next step
YIELDS_WHEN_IDLE = 1  # extra turns after the first submit, so inferlets woken together batch together

Done = Callable[[Any, "BaseException | None"], None]  # (result, exception), called on the event loop
Outcome = tuple[ForwardResult, int] | BaseException  # a chunk's rows in a batch result (from this row), or its failure


@dataclass
class _Chunk:
    req: ForwardRequest
    start: int  # first token of the request in this chunk
    n: int  # tokens in this chunk


# --------------------------------------------------------------------------------------------
# The driver thread
# --------------------------------------------------------------------------------------------

class DriverThread:
    """Runs driver calls one at a time, in submission order, and hands each result back to the
    event loop with one `call_soon_threadsafe` (cheaper than an executor's future chaining)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pie-driver", daemon=True)
        self._thread.start()

    def call(self, fn: Callable, args: tuple, done: Done) -> None:
        self._jobs.put((fn, args, done))

    def stop(self) -> None:
        """Finish the calls already queued, then end the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, done = job
            try:
                result, exc = fn(*args), None
            except BaseException as e:  # noqa: BLE001 — handed to the caller on the loop
                result, exc = None, e
            try:
                self._loop.call_soon_threadsafe(done, result, exc)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass


# --------------------------------------------------------------------------------------------
# The scheduler
# --------------------------------------------------------------------------------------------

class Scheduler:
    def __init__(self, driver: ModelDriver, page_size: int, max_batch_tokens: int, max_batch_kv: int,
                 counters: Counters) -> None:
        self.driver = driver
        self.page_size = page_size
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_kv = max_batch_kv
        self.counters = counters
        self._queue: list[ForwardRequest] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: DriverThread | None = None
        self._busy = False  # a batch is in flight or about to fire
        self._on_batch_done: Callable[[], None] | None = None

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self, on_batch_done: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = DriverThread(self._loop)
        self._on_batch_done = on_batch_done

    async def stop(self) -> None:
        thread, self._thread = self._thread, None  # a batch still in flight or a turn still scheduled is ignored
        for req in self._queue:
            self._abort(req, RuntimeError("the engine stopped"))
        self._queue.clear()
        if thread is not None:
            await asyncio.to_thread(thread.stop)  # the batch in flight ends first
        self._busy = False

    # ---- requests --------------------------------------------------------------------------------

    def submit(self, req: ForwardRequest) -> asyncio.Future:
        if self._thread is None:
            raise RuntimeError("the engine is not running (await engine.start() first)")
        req.future = self._loop.create_future()
        self._queue.append(req)
        if not self._busy:
            self._busy = True
            self._loop.call_soon(self._next_batch, YIELDS_WHEN_IDLE, None)
        return req.future

    def cancel(self, req: ForwardRequest) -> None:
        """The caller gave up: drop a queued request now, an in-flight one when its batch ends.
        (Its future may already be cancelled: asyncio cancels the future a cancelled task awaits.)"""
        if req.cancelled or req not in self._queue:  # already cancelled, or finished
            return
        req.cancelled = True
        if not req.in_flight and req in self._queue:
            self._queue.remove(req)
            self._abort(req, None)

    async def run_driver(self, fn: Callable, *args: Any) -> Any:
        """Run a driver call on the driver thread, after the batch in flight."""
        if self._thread is None:
            return fn(*args)
        fut = self._loop.create_future()

        def done(result: Any, exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is None:
                fut.set_result(result)
            else:
                fut.set_exception(exc)

        self._thread.call(fn, args, done)
        return await fut

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ---- the batch cycle -------------------------------------------------------------------------

    def _next_batch(self, turns: int, woken: list[Any] | None) -> None:
        """Fire the next batch once every context in ``woken`` has queued its next step (None:
        wait all ``turns``), or after ``turns`` more event-loop turns. Checked at the end of a
        turn, so every inferlet that turn woke (also those waiting for pages) can join."""
        if self._thread is None:
            return
        if turns > 0 and (woken is None or not self._all_queued(woken)):
            self._loop.call_soon(self._next_batch, turns - 1, woken)
            return
        self._fire()

    def _fire(self) -> None:
        """Send the queued requests to the driver thread as one batch (or go idle)."""
        if not self._queue:
            self._busy = False
            return
        self._busy = True
        chunks = self._compose()
        for c in chunks:
            c.req.in_flight = True
        started = time.perf_counter()
        self._thread.call(self._execute, (chunks,),
                          lambda results, exc: self._batch_done(chunks, started, results, exc))

    def _all_queued(self, contexts: list[Any]) -> bool:
        queued = {id(r.context) for r in self._queue}
        return all(id(c) in queued for c in contexts)

    def _batch_done(self, chunks: list[_Chunk], started: float, results: list | None,
                    exc: BaseException | None) -> None:
        if self._thread is None:
            return  # stopped: stop() already failed every queued request
        woken: list[Any] | None = None
        try:
            if exc is not None:  # the driver thread itself failed: only this batch's requests fail
                log.error("forward batch failed", exc_info=exc)
                results = [exc] * len(chunks)
            elapsed = time.perf_counter() - started
            woken = self._finish(chunks, results)
            self.counters.record_batch(sum(c.n for c in chunks), len(chunks), elapsed)
            self._on_batch_done()
        finally:  # whatever happened above, the scheduler never stays busy with nothing in flight
            self._next_batch(YIELDS_AFTER_BATCH, woken)

    def _compose(self) -> list[_Chunk]:
        """Pick this step's requests: decode-sized ones first, then prefill chunks."""
        small = [r for r in self._queue if r.remaining <= DECODE_TOKENS and not r.whole]
        large = [r for r in self._queue if r.remaining > DECODE_TOKENS and not r.whole]
        whole = [r for r in self._queue if r.whole]  # an embedding model's inputs, in arrival order
        budget, kv_budget = self.max_batch_tokens, self.max_batch_kv
        chunks: list[_Chunk] = []
        for req in small + whole + large:
            if budget <= 0:
                break
            n = min(req.remaining, budget)
            if req.whole and n < req.remaining:  # waits for the next batch, and no later input takes
                break                            # the room it waits for (it would starve)
            kv_after = req.kv_before + req.done + n
            if chunks and kv_after > kv_budget:
                continue
            chunks.append(_Chunk(req, req.done, n))
            budget -= n
            kv_budget -= kv_after
        return chunks

    def _execute(self, chunks: list[_Chunk]) -> list[Outcome]:
        """On the driver thread: each starting request's copy-on-write copies, then the batch.
        Whatever fails (a copy, a bad request, any exception) fails only the requests it concerns."""
        outcomes: list[Outcome | None] = [None] * len(chunks)
        for i, c in enumerate(chunks):
            if c.start == 0 and c.req.copies:
                try:
                    self.driver.copy_pages([s for s, _ in c.req.copies], [d for _, d in c.req.copies])
                except Exception as exc:  # noqa: BLE001 — this request fails, the others run
                    outcomes[i] = exc
        live = [i for i, o in enumerate(outcomes) if o is None]
        for i, outcome in zip(live, self._forward([chunks[i] for i in live])):
            outcomes[i] = outcome
        return outcomes

    def _forward(self, chunks: list[_Chunk]) -> list[Outcome]:
        """One batch; when it fails with several requests in it, each is retried alone so a bad
        request fails by itself."""
        if not chunks:
            return []
        try:
            return _outcomes(self.driver.forward(self._build(chunks)), chunks)
        except Exception as exc:  # noqa: BLE001 — handed to the requests, never to the loop
            if len(chunks) == 1:
                return [exc]
        out: list[Outcome] = []
        for c in chunks:
            try:
                out += _outcomes(self.driver.forward(self._build([c])), [c])
            except Exception as exc:  # noqa: BLE001
                out.append(exc)
        return out

    def _build(self, chunks: list[_Chunk]) -> ForwardBatch:
        """The chunks as one CSR batch: their tokens back to back, each with its page table."""
        ps = self.page_size
        kv_lens = [c.req.kv_before + c.start + c.n for c in chunks]  # KV of each request after the pass
        n_pages = [-(-kv // ps) for kv in kv_lens]
        rows, samplers, logit_rows = [], [], []
        has_masks = any(c.req.masks is not None for c in chunks)
        has_logit_masks = any(c.req.logit_masks is not None for c in chunks)
        mask_indptr, mask_runs = [0], []
        base = 0  # first batch row of the chunk
        for c, kv_len in zip(chunks, kv_lens):
            req, lo, hi = c.req, c.start, c.start + c.n
            if has_masks:
                for i in range(lo, hi):
                    runs = req.masks[i] if req.masks is not None else None
                    if runs:
                        mask_runs += brle.truncate(runs, kv_len)
                    mask_indptr.append(len(mask_runs))
            for j, row in enumerate(req.output_rows):
                if lo <= row < hi:
                    rows.append(base + row - lo)
                    samplers.append(req.samplers[j])
                    if has_logit_masks:
                        logit_rows.append(req.logit_masks[j] if req.logit_masks is not None else None)
            base += c.n
        i32 = lambda xs: np.asarray(xs, dtype=np.int32)  # noqa: E731
        # a batch whose rows all want hidden states only (embeddings) stops before the LM head
        hidden_only = bool(rows) and all(c.req.hidden_only for c in chunks
                                         if any(c.start <= r < c.start + c.n for r in c.req.output_rows))
        batch = ForwardBatch(
            tokens=np.concatenate([c.req.tokens[c.start : c.start + c.n] for c in chunks]),
            positions=np.concatenate([c.req.positions[c.start : c.start + c.n] for c in chunks]),
            qo_indptr=_indptr([c.n for c in chunks]),
            kv_page_indices=i32([p for c, n in zip(chunks, n_pages) for p in c.req.pages[:n]]),
            kv_page_indptr=_indptr(n_pages),
            kv_last_page_len=i32([kv - (n - 1) * ps for kv, n in zip(kv_lens, n_pages)]),
            output_rows=i32(rows), samplers=samplers, top_k=0 if hidden_only else max(c.req.top_k for c in chunks),
            return_logprobs=not hidden_only, return_logits=not hidden_only and any(c.req.want_logits for c in chunks),
            return_hidden=any(c.req.want_hidden for c in chunks), hidden_only=hidden_only, rows_fail_alone=True,
        )
        if has_masks:
            batch.mask_indptr, batch.mask_runs = i32(mask_indptr), i32(mask_runs)
        if has_logit_masks and rows and not hidden_only:
            words = next(m.shape[-1] for c in chunks if (m := c.req.logit_masks) is not None)
            batch.logit_masks = np.stack([
                m if m is not None else np.full(words, 0xFFFFFFFF, dtype=np.uint32) for m in logit_rows
            ]).astype(np.uint32)
        return batch

    def _finish(self, chunks: list[_Chunk], results: list[Outcome]) -> list[Any]:
        """Store each chunk's outputs; complete, continue or abort its request. Returns the contexts
        woken. A completion callback that raises fails its own request only."""
        woken = []
        for c, res in zip(chunks, results, strict=True):
            req = c.req
            req.in_flight = False
            try:
                if self._finish_one(req, c, res):
                    woken.append(req.context)
            except Exception as exc:  # noqa: BLE001 — a bug in one request's bookkeeping
                log.error("completing a forward request failed", exc_info=exc)
                if req in self._queue:
                    self._queue.remove(req)
                if req.future is not None and not req.future.done():
                    req.future.set_exception(exc)
                woken.append(req.context)
        return woken

    def _finish_one(self, req: ForwardRequest, c: _Chunk, res: Outcome) -> bool:
        """True when the request is over (its context wakes up)."""
        if req.cancelled:
            self._queue.remove(req)
            self._abort(req, None)
            return False
        if isinstance(res, BaseException):
            self._queue.remove(req)
            self._abort(req, res)
            return True
        _store(req, c, *res)
        req.done += c.n
        if req.on_chunk is not None:
            req.on_chunk(req.kv_before + req.done)
        if req.remaining:
            return False
        self._queue.remove(req)
        if req.output is None:  # a pass that samples nothing
            req.output = ForwardOutput.empty([], 0, None)
        if req.on_complete is not None:
            req.on_complete(req.output)
        if not req.future.done():
            req.future.set_result(req.output)
        return True

    @staticmethod
    def _abort(req: ForwardRequest, exc: BaseException | None) -> None:
        try:
            if req.on_abort is not None:
                req.on_abort()
        finally:
            if req.future is not None and not req.future.done():
                if exc is None:
                    req.future.cancel()
                else:
                    req.future.set_exception(exc)


def _outcomes(result: ForwardResult, chunks: list[_Chunk]) -> list[Outcome]:
    """Where each chunk's output rows lie in the batch result: (result, first row), or the error of
    a row that could not be sampled (it fails its own request only)."""
    out, first = [], 0
    for c in chunks:
        n = sum(1 for row in c.req.output_rows if c.start <= row < c.start + c.n)
        error = next((e for e in result.row_errors[first : first + n] if e is not None), None)
        out.append(error if error is not None else (result, first))
        first += n
    return out


def _store(req: ForwardRequest, c: _Chunk, result: ForwardResult, first: int) -> None:
    """Write a chunk's rows of the batch result into the request's output (its rows, in order)."""
    idx = [j for j, row in enumerate(req.output_rows) if c.start <= row < c.start + c.n]
    lo, hi = first, first + len(idx)
    top_k = req.top_k if result.top_ids is not None else 0
    logits = result.logits if req.want_logits else None
    hidden = result.hidden if req.want_hidden else None
    if c.start == 0 and c.n == req.n_tokens:  # the whole request in one chunk (every decode step): views
        req.output = ForwardOutput(
            rows=list(req.output_rows), tokens=result.tokens[lo:hi],
            logprobs=None if result.logprobs is None else result.logprobs[lo:hi],
            top_ids=result.top_ids[lo:hi, :top_k] if top_k else None,
            top_probs=result.top_probs[lo:hi, :top_k] if top_k else None,
            logits=None if logits is None else logits[lo:hi], hidden=None if hidden is None else hidden[lo:hi])
        return
    if req.output is None:
        req.output = ForwardOutput.empty(req.output_rows, top_k, None if logits is None else logits.shape[1],
                                         None if hidden is None else hidden.shape[1])
    if not idx:
        return
    out = req.output
    out.tokens[idx] = result.tokens[lo:hi]
    if result.logprobs is not None:
        out.logprobs[idx] = result.logprobs[lo:hi]
    if top_k:
        out.top_ids[idx] = result.top_ids[lo:hi, :top_k]
        out.top_probs[idx] = result.top_probs[lo:hi, :top_k]
    if logits is not None:
        out.logits[idx] = logits[lo:hi]
    if hidden is not None:
        out.hidden[idx] = hidden[lo:hi]


def _indptr(counts: list[int]) -> np.ndarray:
    """int32 [len(counts) + 1]: 0 then the running sums."""
    out = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=out[1:])
    return out
