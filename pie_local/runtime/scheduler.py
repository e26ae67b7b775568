"""The batch scheduler: every inferlet's forward requests, one driver call at a time.

Work-conserving: a batch fires as soon as the previous one is done and something is queued;
one batch is in flight; the driver call runs on a single worker thread (the ctypes call releases
the GIL), so inferlet code keeps running while the model computes. Decode-sized requests go first;
long prefills are split into chunks that fill the rest of the token budget, so decoders are
never starved by a long prompt. Page operations (copy, read, write) go through the same worker
so they are ordered with the forward passes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pie_local.driver.types import DriverError, ForwardBatch, ForwardResult
from pie_local.runtime.forward import ForwardRequest, brle_truncate
from pie_local.runtime.stats import Counters

log = logging.getLogger("pie_local.runtime")

DECODE_TOKENS = 16  # requests this small are scheduled first (decode steps, draft verification)
YIELDS_AFTER_BATCH = 4  # event-loop turns given to woken inferlets to queue their next step


@dataclass
class _Chunk:
    req: ForwardRequest
    start: int  # first token of the request in this chunk
    n: int  # tokens in this chunk


class Scheduler:
    def __init__(self, driver: Any, page_size: int, max_batch_tokens: int, max_batch_kv: int,
                 counters: Counters) -> None:
        self.driver = driver
        self.page_size = page_size
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_kv = max_batch_kv
        self.counters = counters
        self._queue: list[ForwardRequest] = []
        self._wakeup: asyncio.Event | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None
        self._on_batch_done: Callable[[], None] | None = None

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self, on_batch_done: Callable[[], None]) -> None:
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pie-driver")
        self._on_batch_done = on_batch_done
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="pie-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for req in self._queue:
            self._abort(req, RuntimeError("the engine stopped"))
        self._queue.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ---- requests --------------------------------------------------------------------------------

    def submit(self, req: ForwardRequest) -> asyncio.Future:
        if self._task is None:
            raise RuntimeError("the engine is not running (await engine.start() first)")
        req.future = asyncio.get_running_loop().create_future()
        self._queue.append(req)
        self._wakeup.set()
        return req.future

    def cancel(self, req: ForwardRequest) -> None:
        """The caller gave up: drop a queued request now, an in-flight one when its batch ends."""
        if req.cancelled or (req.future is not None and req.future.done()):
            return
        req.cancelled = True
        if not req.in_flight and req in self._queue:
            self._queue.remove(req)
            self._abort(req, None)

    async def run_driver(self, fn: Callable, *args: Any) -> Any:
        """Run a driver call on the driver thread, after the batch in flight."""
        if self._executor is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ---- the loop --------------------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await asyncio.sleep(0)  # let inferlets woken together queue into one batch
            while self._queue:
                chunks = self._compose()
                for c in chunks:
                    c.req.in_flight = True
                started = time.perf_counter()
                try:
                    results = await loop.run_in_executor(self._executor, self._execute, chunks)
                except Exception as exc:  # noqa: BLE001 — a driver failure fails only this batch's requests
                    log.exception("forward batch failed")
                    results = [exc] * len(chunks)
                elapsed = time.perf_counter() - started
                woken = self._finish(chunks, results)
                self.counters.record_batch(sum(c.n for c in chunks), len(chunks), elapsed)
                self._on_batch_done()
                # Give the contexts this batch woke a few loop turns to queue their next step.
                for _ in range(YIELDS_AFTER_BATCH):
                    if all(any(r.context is c for r in self._queue) for c in woken):
                        break
                    await asyncio.sleep(0)

    def _compose(self) -> list[_Chunk]:
        """Pick this step's requests: decode-sized ones first, then prefill chunks."""
        small = [r for r in self._queue if r.remaining <= DECODE_TOKENS]
        large = [r for r in self._queue if r.remaining > DECODE_TOKENS]
        budget, kv_budget = self.max_batch_tokens, self.max_batch_kv
        chunks: list[_Chunk] = []
        for req in small + large:
            if budget <= 0:
                break
            n = min(req.remaining, budget)
            kv_after = req.kv_before + req.done + n
            if chunks and kv_after > kv_budget:
                continue
            chunks.append(_Chunk(req, req.done, n))
            budget -= n
            kv_budget -= kv_after
        return chunks

    def _execute(self, chunks: list[_Chunk]) -> list[ForwardResult | Exception]:
        """On the driver thread: copy-on-write copies, then the batch. A failing batch of several
        requests is retried one request at a time so a bad request fails alone."""
        copies = [cp for c in chunks if c.start == 0 for cp in c.req.copies]
        if copies:
            self.driver.copy_pages([s for s, _ in copies], [d for _, d in copies])
        try:
            return self._split(self.driver.forward(self._build(chunks)), chunks)
        except DriverError as exc:
            if len(chunks) == 1:
                return [exc]
        out: list[ForwardResult | Exception] = []
        for c in chunks:
            try:
                out += self._split(self.driver.forward(self._build([c])), [c])
            except DriverError as exc:
                out.append(exc)
        return out

    def _build(self, chunks: list[_Chunk]) -> ForwardBatch:
        ps = self.page_size
        tokens, positions, qo, kv_idx, kv_indptr, last_len = [], [], [0], [], [0], []
        rows, samplers, logit_rows = [], [], []
        has_masks = any(c.req.masks is not None for c in chunks)
        has_logit_masks = any(c.req.logit_masks is not None for c in chunks)
        mask_indptr, mask_runs = [0], []
        for c in chunks:
            req, lo, hi = c.req, c.start, c.start + c.n
            base = len(tokens)
            tokens += req.tokens[lo:hi].tolist()
            positions += req.positions[lo:hi].tolist()
            qo.append(len(tokens))
            kv_len = req.kv_before + hi
            n_pages = -(-kv_len // ps)
            kv_idx += req.pages[:n_pages]
            kv_indptr.append(len(kv_idx))
            last_len.append(kv_len - (n_pages - 1) * ps)
            if has_masks:
                for i in range(lo, hi):
                    runs = req.masks[i] if req.masks is not None else None
                    if runs:
                        mask_runs += brle_truncate(runs, kv_len)
                    mask_indptr.append(len(mask_runs))
            for j, row in enumerate(req.output_rows):
                if lo <= row < hi:
                    rows.append(base + row - lo)
                    samplers.append(req.samplers[j])
                    if has_logit_masks:
                        logit_rows.append(req.logit_masks[j] if req.logit_masks is not None else None)
        i32 = lambda xs: np.asarray(xs, dtype=np.int32)  # noqa: E731
        batch = ForwardBatch(
            tokens=i32(tokens), positions=i32(positions), qo_indptr=i32(qo), kv_page_indices=i32(kv_idx),
            kv_page_indptr=i32(kv_indptr), kv_last_page_len=i32(last_len), output_rows=i32(rows),
            samplers=samplers, top_k=max(c.req.top_k for c in chunks),
            return_logprobs=True, return_logits=any(c.req.want_logits for c in chunks),
        )
        if has_masks:
            batch.mask_indptr, batch.mask_runs = i32(mask_indptr), i32(mask_runs)
        if has_logit_masks and rows:
            words = next(m.shape[-1] for c in chunks if (m := c.req.logit_masks) is not None)
            batch.logit_masks = np.stack([
                m if m is not None else np.full(words, 0xFFFFFFFF, dtype=np.uint32) for m in logit_rows
            ]).astype(np.uint32)
        return batch

    @staticmethod
    def _split(result: ForwardResult, chunks: list[_Chunk]) -> list[ForwardResult]:
        """Cut one batch result into one result per chunk (its output rows, in order)."""
        out, i = [], 0
        for c in chunks:
            n = sum(1 for row in c.req.output_rows if c.start <= row < c.start + c.n)
            pick = lambda a, lo=i, hi=i + n: None if a is None else a[lo:hi]  # noqa: E731
            out.append(ForwardResult(tokens=pick(result.tokens), logprobs=pick(result.logprobs),
                                     top_ids=pick(result.top_ids), top_probs=pick(result.top_probs),
                                     logits=pick(result.logits)))
            i += n
        return out

    def _finish(self, chunks: list[_Chunk], results: list) -> list[Any]:
        """Store each chunk's outputs; complete, continue or abort its request. Returns the contexts woken."""
        woken = []
        for c, res in zip(chunks, results, strict=True):
            req = c.req
            req.in_flight = False
            if req.cancelled:
                self._queue.remove(req)
                self._abort(req, None)
                continue
            if isinstance(res, Exception):
                self._queue.remove(req)
                self._abort(req, res)
                woken.append(req.context)
                continue
            self._store(req, c, res)
            req.done += c.n
            if req.on_chunk is not None:
                req.on_chunk(req.kv_before + req.done)
            if req.remaining == 0:
                self._queue.remove(req)
                out = req.on_complete(req) if req.on_complete is not None else None
                if not req.future.done():
                    req.future.set_result(out)
                woken.append(req.context)
        return woken

    @staticmethod
    def _store(req: ForwardRequest, c: _Chunk, res: ForwardResult) -> None:
        n_out = len(req.output_rows)
        if req.out_tokens is None:
            req.out_tokens = np.zeros(n_out, dtype=np.int32)
        idx = [j for j, row in enumerate(req.output_rows) if c.start <= row < c.start + c.n]
        if not idx:
            return
        req.out_tokens[idx] = res.tokens
        if res.logprobs is not None:
            if req.out_logprobs is None:
                req.out_logprobs = np.zeros(n_out, dtype=np.float32)
            req.out_logprobs[idx] = res.logprobs
        if req.top_k > 0 and res.top_ids is not None:
            if req.out_top_ids is None:
                req.out_top_ids = np.zeros((n_out, req.top_k), dtype=np.int32)
                req.out_top_probs = np.zeros((n_out, req.top_k), dtype=np.float32)
            req.out_top_ids[idx] = res.top_ids[:, : req.top_k]
            req.out_top_probs[idx] = res.top_probs[:, : req.top_k]
        if req.want_logits and res.logits is not None:
            if req.out_logits is None:
                req.out_logits = np.zeros((n_out, res.logits.shape[1]), dtype=np.float32)
            req.out_logits[idx] = res.logits

    @staticmethod
    def _abort(req: ForwardRequest, exc: BaseException | None) -> None:
        if req.on_abort is not None:
            req.on_abort()
        if req.future is not None and not req.future.done():
            if exc is None:
                req.future.cancel()
            else:
                req.future.set_exception(exc)
