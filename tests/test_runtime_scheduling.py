"""Scheduler, pages and inferlet isolation on FakeDriver (issue 3's runtime tests)."""

from __future__ import annotations

import asyncio

import numpy as np

import pytest

from pie_local.driver.fake import FakeDriver
from pie_local.driver.types import DriverError, DriverParams
from pie_local.runtime import Engine, InferletCancelled, Limits, OutOfPagesError, WallTimeExceeded
from runtime_helpers import fake_engine

PS = 4  # tokens per page in these tests


def make_engine(n_pages: int = 64, max_batch_tokens: int = 64, **kw) -> tuple[Engine, FakeDriver]:
    driver = FakeDriver(DriverParams(page_size=PS, n_pages=n_pages, max_batch_tokens=max_batch_tokens), **kw)
    return fake_engine(driver), driver


async def test_one_driver_call_carries_several_inferlets():
    engine, driver = make_engine()
    async with engine:
        async def decoder(rt, args):
            ctx = rt.context()
            ctx.fill(f"inferlet {args['i']} says:")
            return await ctx.generate(max_tokens=12)

        decoder.PARAMETERS = {}
        from pie_local.runtime.inferlet import Param

        decoder.PARAMETERS = {"i": Param(int, required=True)}
        handles = [engine.launch(decoder, {"i": i}) for i in range(4)]
        texts = await asyncio.gather(*(h.result() for h in handles))
    assert all(len(t.encode("utf-8", "surrogateescape")) > 0 for t in texts)
    # the four prompts were prefilled together, and their decode steps ran as 4-request batches
    assert max(b["n_requests"] for b in driver.stats.batches) == 4
    four = [b for b in driver.stats.batches if b["n_requests"] == 4]
    assert len(four) >= 10, driver.stats.batches
    assert engine.stats().max_batch_requests == 4


async def test_batched_generation_equals_sequential():
    prompts = ["alpha beta", "gamma", "delta epsilon zeta"]

    async def gen(engine, p):
        ctx = engine.context()
        ctx.fill(p)
        await ctx.generate(max_tokens=8)
        return ctx.last.token_ids

    engine, _ = make_engine()
    async with engine:
        together = await asyncio.gather(*(gen(engine, p) for p in prompts))
    engine, _ = make_engine()
    async with engine:
        alone = [await gen(engine, p) for p in prompts]
    assert together == alone


async def test_shared_system_prompt_is_prefilled_once():
    engine, driver = make_engine()
    system = "You are a helpful assistant. " * 2  # 58 bytes + <bos> = 59 tokens: 14 full pages + 3
    n_prompt = 1 + len(system.encode())
    async with engine:
        async def chat(rt, args):
            ctx = rt.context()
            ctx.fill(system)
            await ctx.flush()
            return ctx.n_pages

        handles = [engine.launch(chat) for _ in range(3)]
        assert [await h.result() for h in handles] == [15, 15, 15]
        full = n_prompt // PS * PS
        # the 14 full pages are computed by one inferlet; the others compute only their partial tail
        assert driver.stats.tokens == n_prompt + 2 * (n_prompt - full)
        stats = engine.stats()
        assert stats.prefix_hit_rate == pytest.approx(2 * full / (3 * n_prompt))


async def test_prefix_cache_keeps_released_pages_in_lru_and_reclaims_them():
    engine, driver = make_engine(n_pages=16)
    async with engine:
        ctx = engine.context()
        ctx.fill_tokens(list(range(10, 30)))  # 20 tokens = 5 full pages
        await ctx.flush()
        ctx.release()
        assert engine.pool.n_cached == 5 and engine.pool.n_used == 0
        before = driver.stats.tokens
        again = engine.context()
        again.fill_tokens(list(range(10, 30)) + [7, 8])
        await again.flush()
        assert driver.stats.tokens - before == 2  # 20 tokens came from the cache
        assert again.n_pages == 6
        again.release()
        # a big allocation needs the cached pages: they are evicted and the prefix is forgotten
        big = engine.context()
        big.fill_tokens([40] * 64)  # 16 pages = the whole pool
        await big.flush()
        assert engine.pool.n_free == 0 and engine.pool.evictions >= 5
        big.release()
        before = driver.stats.tokens
        third = engine.context()
        third.fill_tokens(list(range(10, 30)))
        await third.flush()
        assert driver.stats.tokens - before == 20


async def test_fork_shares_pages_and_copies_the_tail_on_write():
    engine, driver = make_engine()
    async with engine:
        ctx = engine.context()
        ctx.fill_tokens(list(range(20, 30)))  # 10 tokens: 2 full pages + a tail of 2
        await ctx.flush()
        pool = engine.pool
        assert (ctx.n_pages, pool.n_used) == (3, 3)
        kids = ctx.fork(3)
        assert pool.n_used == 3 and pool.n_shared == 3  # fork copied nothing
        assert all(k.token_ids == ctx.token_ids for k in kids)
        copies = driver.stats.copies
        outs = await asyncio.gather(*(k.generate(SamplingParams_(seed=i), max_tokens=3) for i, k in enumerate(kids)))
        # each child copied the shared tail page once before writing into it
        assert driver.stats.copies - copies == 3
        assert pool.n_used == 3 + 3  # the parent's 3 pages + one private tail per child
        assert all(k.n_pages == 3 for k in kids)
        assert [k.token_ids[:10] for k in kids] == [ctx.token_ids] * 3
        assert len(set(outs)) > 1  # seeds differ
        for k in kids:
            k.release()
        assert pool.n_used == 3
        ctx.release()
        assert pool.n_used == 0


def SamplingParams_(seed: int):
    from pie_local.runtime import SamplingParams

    return SamplingParams(temperature=1.0, seed=seed)


async def test_fork_generation_equals_unforked_generation():
    engine, _ = make_engine()
    async with engine:
        base = engine.context()
        base.fill("a shared prefix of some length")
        await base.flush()
        kid = base.fork1()
        forked = await kid.generate(max_tokens=6)
        fresh = engine.context()
        fresh.fill("a shared prefix of some length")
        assert await fresh.generate(max_tokens=6) == forked


async def test_out_of_pages_reaches_the_inferlet_that_asked():
    engine, _ = make_engine(n_pages=8)
    async with engine:
        async def greedy(rt, args):
            ctx = rt.context()
            ctx.fill_tokens([9] * 100)  # 25 pages > 8
            await ctx.flush()

        async def modest(rt, args):
            ctx = rt.context()
            ctx.fill("hi")
            return await ctx.generate(max_tokens=4)

        bad, good = engine.launch(greedy), engine.launch(modest)
        with pytest.raises(OutOfPagesError, match="out of KV pages"):
            await bad.result()
        assert len(await good.result()) > 0
        assert (bad.state, good.state) == ("failed", "done")
        assert engine.pool.n_used == 0


async def test_page_and_token_limits():
    engine, _ = make_engine()
    async with engine:
        async def big(rt, args):
            ctx = rt.context()
            ctx.fill_tokens([9] * 40)
            await ctx.flush()

        h = engine.launch(big, limits=Limits(max_pages=5))
        with pytest.raises(OutOfPagesError, match="limit is 5"):
            await h.result()
        h = engine.launch(big, limits=Limits(max_tokens=30))
        with pytest.raises(RuntimeError, match="limit is 30"):
            await h.result()
        assert engine.pool.n_used == 0


async def test_cancellation_frees_pages():
    engine, _ = make_engine()
    async with engine:
        async def holder(rt, args):
            ctx = rt.context()
            ctx.fill_tokens([5] * 30)
            await ctx.flush()
            rt.send("ready")
            await rt.receive()  # waits forever

        h = engine.launch(holder)
        msgs = h.messages()
        assert (await msgs.__anext__()).data == "ready"
        assert engine.pool.n_used == 8 and h.pages == 8
        h.cancel()
        with pytest.raises(InferletCancelled):
            await h.result()
        assert h.state == "cancelled" and engine.pool.n_used == 0


async def test_cancel_during_forward_pass_frees_pages_and_others_continue():
    engine, driver = make_engine(delay=0.02)
    async with engine:
        async def long(rt, args):
            ctx = rt.context()
            ctx.fill("x")
            await ctx.generate(max_tokens=1000)

        async def short(rt, args):
            ctx = rt.context()
            ctx.fill("y")
            return await ctx.generate(max_tokens=5)

        a, b = engine.launch(long), engine.launch(short)
        await asyncio.sleep(0.1)
        a.cancel()
        assert len(await b.result()) > 0
        with pytest.raises(InferletCancelled):
            await a.result()
        # the page the cancelled pass was writing comes back when that batch finishes
        for _ in range(200):
            if engine.pool.n_used == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.pool.n_used == 0


async def test_raising_and_hanging_inferlets_do_not_stop_the_others():
    engine, _ = make_engine()
    async with engine:
        async def raises(rt, args):
            ctx = rt.context()
            ctx.fill("boom")
            await ctx.flush()
            raise ValueError("inferlet bug")

        async def hangs(rt, args):
            ctx = rt.context()
            ctx.fill("zzz")
            await ctx.flush()
            await asyncio.sleep(3600)

        async def works(rt, args):
            ctx = rt.context()
            ctx.fill("fine")
            return await ctx.generate(max_tokens=20)

        r, h, w = engine.launch(raises), engine.launch(hangs, limits=Limits(wall_time=0.2)), engine.launch(works)
        with pytest.raises(ValueError, match="inferlet bug"):
            await r.result()
        with pytest.raises(WallTimeExceeded):
            await h.result()
        assert len(await w.result()) > 0
        assert (r.state, h.state, w.state) == ("failed", "failed", "done")
        assert engine.pool.n_used == 0
        # the engine still serves new work
        assert len(await engine.run(works)) > 0


async def test_chunked_prefill_does_not_starve_decoders():
    engine, driver = make_engine(n_pages=128, max_batch_tokens=16)
    async with engine:
        started = asyncio.Event()

        async def decoder(rt, args):
            ctx = rt.context()
            ctx.fill("d")
            await ctx.flush()
            started.set()
            return await ctx.generate(max_tokens=30)

        async def prefill(rt, args):
            await started.wait()
            ctx = rt.context()
            ctx.fill_tokens([11] * 300)
            await ctx.flush()

        d, p = engine.launch(decoder), engine.launch(prefill)
        await asyncio.gather(d.result(), p.result())
    batches = driver.stats.batches
    assert max(b["n_tokens"] for b in batches) <= 16
    mixed = [b for b in batches if b["n_requests"] == 2]
    # while the 300-token prompt was prefilled in chunks, every step still carried the decoder
    assert len(mixed) >= 15
    assert all(b["n_tokens"] == 16 for b in mixed[:-1])


async def test_prefix_waits_for_pages_in_flight_instead_of_recomputing():
    engine, driver = make_engine(delay=0.01)
    async with engine:
        a, b = engine.context(), engine.context()
        a.fill_tokens(list(range(30, 62)))  # 32 tokens = 8 full pages
        b.fill_tokens(list(range(30, 62)) + [1, 2])
        await asyncio.gather(a.flush(), b.flush())
        assert driver.stats.tokens == 32 + 2
        assert a.page_ids == b.page_ids[:8]


async def test_pages_of_a_chunked_prefill_are_shared_only_once_computed():
    engine, driver = make_engine(max_batch_tokens=8)
    async with engine:
        a, b = engine.context(), engine.context()
        prompt = [10 + i % 7 for i in range(40)]  # 10 full pages, prefilled in 5 chunks of 8
        a.fill_tokens(prompt)
        b.fill_tokens(prompt + [3, 4])
        flush_a = asyncio.ensure_future(a.flush())
        await asyncio.sleep(0)  # a's request (and its in-flight pages) is registered first
        out = await b.forward().input([5]).probe(0, logits=True).execute()
        await flush_a
        expect = [(t, i) for i, t in enumerate(prompt + [3, 4, 5])]
        np.testing.assert_array_equal(out.logits[0], driver.logits_for(expect))
        assert driver.stats.tokens == 40 + 3  # b waited for a's pages instead of computing them
        assert b.page_ids[:10] == a.page_ids


async def test_a_request_the_driver_rejects_fails_alone():
    from pie_local.driver.types import DriverError

    engine, driver = make_engine()
    async with engine:
        async def bad(rt, args):
            ctx = rt.context()
            ctx.fill("x")
            nothing = np.zeros((ctx.engine_info.n_vocab + 31) // 32, dtype=np.uint32)
            await ctx.forward().input([20]).sample(0, logit_mask=nothing).execute()

        async def good(rt, args):
            ctx = rt.context()
            ctx.fill("y")
            return await ctx.generate(max_tokens=3)

        b, g = engine.launch(bad), engine.launch(good)
        with pytest.raises(DriverError, match="allows no token"):
            await b.result()
        assert len(await g.result()) > 0
        assert engine.pool.n_used == 0


async def test_an_inferlets_own_timeout_is_not_its_wall_time_limit():
    engine, _ = make_engine()
    async with engine:
        async def impatient(rt, args):
            await asyncio.wait_for(rt.receive(), 0.01)

        h = engine.launch(impatient, limits=Limits(wall_time=30))
        with pytest.raises(TimeoutError) as info:
            await h.result()
        assert not isinstance(info.value, WallTimeExceeded) and h.state == "failed"


class FaultyDriver(FakeDriver):
    """Fails page copies into ``bad_copy_dst`` pages, and any batch holding ``bad_token``
    with a plain exception (not a DriverError): a bug, not a rejected input."""

    bad_copy_dst: set[int] = set()
    bad_token: int | None = None

    def copy_pages(self, src, dst):
        if set(int(d) for d in dst) & self.bad_copy_dst:
            raise OSError("simulated copy failure")
        super().copy_pages(src, dst)

    def forward(self, batch):
        if self.bad_token is not None and self.bad_token in batch.tokens:
            raise ZeroDivisionError("simulated bug in the forward path")
        return super().forward(batch)


async def step_all(contexts):
    """One decode step of every context, in one batch; the outcome of each."""
    return await asyncio.gather(*(c.generate(max_tokens=1) for c in contexts), return_exceptions=True)


async def test_a_failed_page_copy_fails_only_the_request_that_needed_it():
    driver = FaultyDriver(DriverParams(page_size=PS, n_pages=64, max_batch_tokens=64))
    engine = fake_engine(driver)
    async with engine:
        base = engine.context()
        base.fill("abcdef")  # 7 tokens with BOS: the tail page is partial, so a fork copies it
        await base.flush()
        forked = base.fork1()
        other = engine.context()
        other.fill("xy")  # 3 tokens in its own partial page: written in place, no copy
        await other.flush()
        used = engine.pool.n_used
        driver.bad_copy_dst = set(range(64))  # every copy fails from now on
        results = await step_all([forked, other])
        assert isinstance(results[0], OSError) and isinstance(results[1], str)
        assert engine.pool.n_used == used  # the page the fork's copy was going to fill went back
        driver.bad_copy_dst = set()
        assert isinstance((await step_all([forked]))[0], str)  # the failed request can be retried


async def test_a_non_driver_exception_fails_only_its_request():
    driver = FaultyDriver(DriverParams(page_size=PS, n_pages=64, max_batch_tokens=64))
    engine = fake_engine(driver)
    async with engine:
        good, bad = engine.context(), engine.context()
        good.fill("fine")
        bad.fill("trouble!")
        driver.bad_token = bad.token_ids[-1]
        results = await step_all([good, bad])
        assert isinstance(results[0], str) and isinstance(results[1], ZeroDivisionError)
        assert good.kv_len == len(good.token_ids) - 1  # committed, with its sampled token pending
        assert bad.kv_len == 0 and len(bad.token_ids) == 9  # nothing committed, nothing lost


async def test_a_completion_callback_that_raises_cannot_stall_the_scheduler():
    engine, _ = make_engine()
    async with engine:
        victim = engine.context()
        victim.fill("abc")
        sequence = victim.sequence
        real_plan = sequence._plan  # wrap this context's own planner (same test, no other module)

        def plan_with_broken_commit(*args, **kwargs):
            req = real_plan(*args, **kwargs)

            def broken(_output):
                raise KeyError("simulated bug in a commit callback")

            req.on_complete = broken
            return req

        sequence._plan = plan_with_broken_commit
        bystander = engine.context()
        bystander.fill("xyz")
        results = await step_all([victim, bystander])
        assert isinstance(results[0], KeyError) and isinstance(results[1], str)
        for _ in range(3):  # later batches still run
            assert isinstance((await step_all([bystander]))[0], str)


async def test_a_task_cancelled_while_its_pass_runs_gives_back_every_page():
    # asyncio cancels the future a cancelled task awaits: the scheduler must still learn of the
    # cancel, and the pages of the pass must not land in the released context
    engine, driver = make_engine(delay=0.05)
    async with engine:
        async def long_decode(rt, args):
            ctx = rt.context()
            ctx.fill("a prompt " * 8)
            await ctx.generate(max_tokens=200)

        for delay in (0.01, 0.07, 0.13, 0.26):
            handle = engine.launch(long_decode)
            await asyncio.sleep(delay)
            handle.cancel()
            with pytest.raises(InferletCancelled):
                await handle.result()
            for _ in range(40):  # the pass in flight ends, then its pages come back
                if engine.pool.n_used == 0 and engine.stats().queued_requests == 0:
                    break
                await asyncio.sleep(0.05)
            assert engine.pool.n_used == 0, delay


async def test_a_row_that_cannot_be_sampled_fails_only_its_request():
    # a NaN in one row's logits (FakeDriver: a poisoned token in its view) fails that request;
    # the others of the same batch get their tokens
    engine, driver = make_engine(nan_tokens=[ord("!") + 5])
    async with engine:
        good, bad = engine.context(), engine.context()
        good.fill("fine")
        bad.fill("oops!")
        results = await step_all([good, bad])
        assert isinstance(results[0], str), results[0]
        assert isinstance(results[1], DriverError) and "NaN" in str(results[1]), results[1]
        assert max(b["n_requests"] for b in driver.stats.batches) == 2  # they really were one batch
        assert bad.kv_len == 0 and engine.pool.n_used == good.n_pages


async def test_the_scheduler_keeps_each_batch_within_max_batch_kv():
    # two contexts of 40 tokens of KV each: together they exceed the driver's 48-row budget, so
    # every step runs them in separate batches instead of sending a batch the driver would refuse
    class Recording(FakeDriver):  # every batch the scheduler sends, refused ones included
        sent: list[int] = []

        def forward(self, batch):
            self.sent.append(batch.n_requests)
            return super().forward(batch)

    driver = Recording(DriverParams(page_size=PS, n_pages=64, max_batch_tokens=64, max_batch_kv=48))
    engine = fake_engine(driver)
    async with engine:
        contexts = [engine.context(), engine.context()]
        for i, ctx in enumerate(contexts):
            ctx.fill(f"{i}" * 39)
            await ctx.flush()
        start = len(driver.sent)
        results = await asyncio.gather(*(c.generate(max_tokens=4) for c in contexts))
        assert all(isinstance(r, str) for r in results)
        steps = driver.sent[start:]
        assert len(steps) >= 8 and set(steps) == {1}, steps
