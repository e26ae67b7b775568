"""The scheduler's driver thread and batch cycle: ordering, failures, stopping, page placement."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from pie_local.driver.fake import FakeDriver
from pie_local.driver.types import DriverParams, ForwardBatch
from pie_local.runtime import Engine
from pie_local.runtime.sampling import SamplingParams
from pie_local.runtime.scheduler import DriverThread, _indptr
from runtime_helpers import fake_engine

PS = 4


def make_engine(n_pages: int = 64, **kw) -> tuple[Engine, FakeDriver]:
    driver = FakeDriver(DriverParams(page_size=PS, n_pages=n_pages, max_batch_tokens=64), **kw)
    return fake_engine(driver), driver


async def test_driver_thread_runs_calls_in_order_off_the_loop_and_returns_results_on_it():
    loop = asyncio.get_running_loop()
    worker = DriverThread(loop)
    got: list[tuple] = []
    all_done = asyncio.Event()

    def job(i: int) -> tuple[int, str]:
        time.sleep(0.002 if i % 2 else 0)  # a slow call still keeps its place
        return i, threading.current_thread().name

    def done(result, exc) -> None:
        got.append((result, exc, threading.current_thread() is threading.main_thread()))
        if len(got) == 6:
            all_done.set()

    for i in range(6):
        worker.call(job, (i,), done)
    await asyncio.wait_for(all_done.wait(), 5)
    worker.stop()
    assert [r[0] for r, _, _ in got] == list(range(6))
    assert {r[1] for r, _, _ in got} == {"pie-driver"}
    assert all(exc is None and on_loop for _, exc, on_loop in got)


async def test_driver_thread_hands_exceptions_back_and_keeps_going():
    worker = DriverThread(asyncio.get_running_loop())
    fut_bad, fut_good = asyncio.get_running_loop().create_future(), asyncio.get_running_loop().create_future()
    worker.call(lambda: 1 / 0, (), lambda r, e: fut_bad.set_result((r, e)))
    worker.call(lambda x: x * 2, (21,), lambda r, e: fut_good.set_result((r, e)))
    r, e = await asyncio.wait_for(fut_bad, 5)
    assert r is None and isinstance(e, ZeroDivisionError)
    assert await asyncio.wait_for(fut_good, 5) == (42, None)
    worker.stop()


def test_indptr_is_zero_then_running_sums():
    assert _indptr([3, 1, 2]).tolist() == [0, 3, 4, 6]
    assert _indptr([]).tolist() == [0]
    assert _indptr([1]).dtype == np.int32


async def test_decode_steps_of_woken_contexts_share_one_batch_every_step():
    engine, driver = make_engine()
    async with engine:
        ctxs = [engine.context() for _ in range(3)]
        for i, c in enumerate(ctxs):
            c.fill(f"prompt {i}")
        await asyncio.gather(*(c.generate(SamplingParams(), max_tokens=10) for c in ctxs))
        n = [len(c.last.token_ids) for c in ctxs]
        for c in ctxs:
            c.release()
    decode = [b for b in driver.stats.batches if b["n_tokens"] == b["n_requests"]]
    # every step in which all three still decode carries all three: no step fires early
    assert sum(1 for b in decode if b["n_requests"] == 3) >= min(n) - 1
    assert max(b["n_requests"] for b in driver.stats.batches) == 3


async def test_page_operations_wait_for_the_batch_in_flight():
    engine, driver = make_engine(delay=0.05)
    order: list[str] = []
    real_forward, real_read = driver.forward, driver.read_pages
    driver.forward = lambda b: (order.append("forward"), real_forward(b))[1]
    driver.read_pages = lambda p: (order.append("read"), real_read(p))[1]
    async with engine:
        ctx = engine.context()
        ctx.fill("abcdefgh")
        flush = asyncio.ensure_future(ctx.flush())
        await asyncio.sleep(0.01)  # the batch is in flight
        data = await engine._scheduler.run_driver(driver.read_pages, [0])
        await flush
        ctx.release()
    assert order == ["forward", "read"]
    assert len(data) == driver.info.page_bytes


async def test_stopping_with_a_batch_in_flight_fails_its_request_and_ends_the_thread():
    engine, _ = make_engine(delay=0.2)
    await engine.start()
    ctx = engine.context()
    ctx.fill("hello")
    flush = asyncio.ensure_future(ctx.flush())
    await asyncio.sleep(0.02)
    await engine.stop()
    with pytest.raises(RuntimeError, match="engine stopped"):
        await flush
    assert not [t for t in threading.enumerate() if t.name == "pie-driver"]


async def test_a_driver_exception_fails_the_batch_and_the_scheduler_carries_on():
    engine, driver = make_engine()
    real_forward = driver.forward
    calls = {"n": 0}

    def flaky(batch: ForwardBatch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("simulated")  # not a DriverError: the whole batch fails
        return real_forward(batch)

    driver.forward = flaky
    async with engine:
        ctx = engine.context()
        ctx.fill("ab")
        await ctx.flush()
        with pytest.raises(MemoryError, match="simulated"):
            await ctx.forward().input([40]).sample(0).execute()
        out = await ctx.forward().input([41]).sample(0).execute()  # the next step works
        assert out.tokens.shape == (1,)
        ctx.release()


def _runs(ids: list[int]) -> int:
    return sum(1 for i, x in enumerate(ids) if i == 0 or x != ids[i - 1] + 1)


async def test_contexts_growing_side_by_side_keep_their_pages_in_runs():
    engine, _ = make_engine(n_pages=64)
    async with engine:
        a, b = engine.context(), engine.context()
        a.fill("a" * (PS + 1))
        b.fill("b" * (PS + 1))

        async def decode(ctx):
            for _ in range(6 * PS):  # across six page boundaries, in step with the other context
                await ctx.forward().input([50]).sample(0).execute()

        await asyncio.gather(decode(a), decode(b))
        ids = [a.page_ids, b.page_ids]
        a.release()
        b.release()
    # each sequence's new pages follow its last page (the driver reads a run as one slice);
    # handing out the lowest free ids instead would interleave the two: a run per page
    assert [len(x) for x in ids] == [-(-(7 * PS + 1) // PS)] * 2
    assert all(_runs(x) <= 2 for x in ids), ids
