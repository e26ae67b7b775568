"""The page pool, and a randomized check that shared/forked/truncated KV is always the right KV."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pie_local.driver.fake import FakeDriver
from pie_local.driver.types import DriverParams
from pie_local.runtime import OutOfPagesError
from pie_local.runtime.pages import PagePool
from runtime_helpers import fake_engine


def test_pool_allocates_refcounts_and_caches_indexed_pages():
    pool = PagePool(4, 2, "m")
    a, b = pool.allocate(2)
    assert pool.n_free == 2 and a.writable
    key = pool.chain_hash(None, [1, 2])
    assert pool.register(a, key, ready=False) and not pool.register(b, key, ready=True)
    assert pool.lookup(key) is a and not a.ready and not a.writable
    pool.mark_ready(a)
    pool.incref(a)
    pool.decref(a)
    pool.decref(a)  # unreferenced but indexed: cached, still found
    assert pool.n_cached == 1 and pool.n_free == 3 and pool.lookup(key) is a
    pool.incref(a)  # a prefix hit takes it back out of the LRU
    assert pool.n_cached == 0 and pool.n_used == 2
    pool.decref(a)
    pool.decref(b)
    with pytest.raises(OutOfPagesError, match="need 5, 4 free of 4"):
        pool.allocate(5)
    pages = pool.allocate(4)  # reclaims the cached page
    assert pool.evictions == 1 and pool.lookup(key) is None and len({p.id for p in pages}) == 4


def ids(pages):
    return [p.id for p in pages]


def test_pool_places_a_sequence_on_consecutive_page_ids():
    pool = PagePool(32, 2, "m")
    a = pool.allocate(3)  # a new sequence in an empty pool: from id 0
    assert ids(a) == [0, 1, 2]
    # the next new sequence goes to the middle of the free run [3, 32), leaving a room to grow
    b = pool.allocate(2)
    assert ids(b) == [16, 17]
    # growth continues right after the sequence's last page while those ids are free
    assert ids(pool.allocate(2, after=a[-1])) == [3, 4]
    assert ids(pool.allocate(3, after=b[-1])) == [18, 19, 20]
    # blocked growth (id 1 is taken) moves to the middle of the largest free run: [5, 16) and
    # [21, 32) tie, the lower one wins
    assert ids(pool.allocate(1, after=a[0])) == [10]
    pool.release(a)  # free runs now [0, 3), [5, 10), [11, 16), [21, 32)
    assert ids(pool.allocate(2)) == [25, 26]
    # fragmented: no free run holds the request, so the lowest free ids
    rest = pool.allocate(pool.n_free - 1)
    free_ids = [i for i in range(32) if pool.pages[i].refs == 0]
    assert len(free_ids) == 1 and ids(rest) == sorted(ids(rest)) and ids(rest)[-1] < free_ids[0]
    pool.release([rest[0], rest[-1]])
    assert ids(pool.allocate(3)) == [ids(rest)[0], ids(rest)[-1], free_ids[0]]
    assert pool.n_free == 0


def test_pool_placement_at_the_end_of_the_pool_and_after_eviction():
    pool = PagePool(6, 2, "m")
    pages = pool.allocate(6)
    assert ids(pages) == list(range(6))
    key = pool.chain_hash(None, [1, 2])
    pool.register(pages[4], key, ready=True)
    pool.release([pages[1], pages[3], pages[4]])  # 1 and 3 free, 4 cached in the LRU
    assert pool.n_free == 3 and pool.n_cached == 1
    # the last page of the pool has no next id: the largest free run instead (never the cache)
    (grown,) = pool.allocate(1, after=pages[5])
    assert grown.id == 1 and pool.n_cached == 1
    got = pool.allocate(2)  # needs the cached page: evicted, then 3 and 4 form a run
    assert ids(got) == [3, 4] and pool.evictions == 1 and pool.lookup(key) is None


def test_pool_forgets_a_page_whose_computation_was_abandoned():
    pool = PagePool(2, 2, "m")
    (a,) = pool.allocate(1)
    key = pool.chain_hash(None, [3, 4])
    pool.register(a, key, ready=False)
    pool.decref(a)
    assert pool.lookup(key) is None and pool.n_free == 2 and pool.n_cached == 0


def test_chain_hash_depends_on_the_whole_chain_and_the_model():
    p, q = PagePool(1, 2, "m1"), PagePool(1, 2, "m2")
    first = p.chain_hash(None, [1, 2])
    assert p.chain_hash(first, [3, 4]) != p.chain_hash(p.chain_hash(None, [9, 9]), [3, 4])
    assert first != q.chain_hash(None, [1, 2])


@pytest.mark.parametrize("seed", range(6))
async def test_random_fork_truncate_share_release_keeps_kv_exact(seed):
    """Random operations over several contexts; after each, every live context's next-token
    logits must equal the toy model's logits over exactly its own tokens (the FakeDriver reads
    the real page slots, so a wrong page, a missed copy or a reused page would show)."""
    rng = random.Random(seed)
    ps = 4
    driver = FakeDriver(DriverParams(page_size=ps, n_pages=96, max_batch_tokens=24))
    engine = fake_engine(driver)
    async with engine:
        pool = engine.pool
        vocab = [10, 11, 12]  # a tiny alphabet makes shared prefixes common
        live = [engine.context()]
        live[0].fill_tokens([rng.choice(vocab) for _ in range(9)])
        for _ in range(40):
            op = rng.choice(["fill", "fill", "flush", "gen", "fork", "truncate", "release", "new"])
            ctx = rng.choice(live)
            if op == "fill":
                ctx.fill_tokens([rng.choice(vocab) for _ in range(rng.randint(1, 9))])
            elif op == "flush":
                await ctx.flush()
            elif op == "gen" and len(ctx):
                await ctx.generate(max_tokens=rng.randint(1, 5))
            elif op == "fork" and len(live) < 8:
                live.append(ctx.fork1())
            elif op == "truncate" and len(ctx):
                ctx.truncate(rng.randint(0, len(ctx)))
            elif op == "release" and len(live) > 1:
                live.remove(ctx)
                ctx.release()
            elif op == "new":
                fresh = engine.context()
                fresh.fill_tokens(list(rng.choice(live).token_ids[: rng.randint(0, 20)]) + [rng.choice(vocab)])
                live.append(fresh)
            # refcounts are exactly the contexts' references
            refs: dict[int, int] = {}
            for c in live:
                for pid in c.page_ids:
                    refs[pid] = refs.get(pid, 0) + 1
            assert {p.id: p.refs for p in pool.pages if p.refs} == refs
            assert pool.n_used == len(refs)
        for c in live:
            if not len(c):
                continue
            expect = [(t, i) for i, t in enumerate(c.token_ids)] + [(13, len(c))]
            out = await c.forward().input([13]).probe(0, logits=True).execute()
            np.testing.assert_array_equal(out.logits[0], driver.logits_for(expect))
