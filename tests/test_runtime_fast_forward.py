"""Forced tokens in one pass on FakeDriver: what a constraint forces (llguidance's fast-forward)
goes into the KV with the next sampled token's pass, not one pass per token."""

from __future__ import annotations

import json
import math

from pie_local.driver.fake import FakeDriver
from pie_local.driver.types import DriverParams
from pie_local.runtime.constraints import AllOf, JsonSchema, Regex
from runtime_helpers import fake_engine

SCHEMA = {
    "type": "object",
    "properties": {
        "customer_identification_number": {"type": "integer", "minimum": 0, "maximum": 99},
        "is_account_in_good_standing": {"type": "boolean"},
    },
    "required": ["customer_identification_number", "is_account_in_good_standing"],
    "additionalProperties": False,
}


def make_engine():
    driver = FakeDriver(DriverParams(page_size=4, n_pages=256, max_batch_tokens=128))
    return fake_engine(driver), driver


async def generate(engine, driver, **kw):
    ctx = engine.context()
    ctx.fill("Record:")
    calls = driver.stats.calls
    result = await ctx.generate(max_tokens=200, constrain=JsonSchema(SCHEMA), **kw)
    return ctx, result, driver.stats.calls - calls


async def test_forced_tokens_share_the_pass_of_the_next_sampled_token():
    slow_engine, slow_driver = make_engine()
    engine, driver = make_engine()  # apart: one would find the other's output in its prefix cache
    async with slow_engine, engine:
        slow_ctx, slow, slow_calls = await generate(slow_engine, slow_driver, fast_forward=False)
        fast_ctx, fast, fast_calls = await generate(engine, driver)
        value = json.loads(fast)
        assert set(value) == set(SCHEMA["required"])
        # greedy under the same masks: the same text and tokens, in far fewer passes
        assert fast == slow and fast.token_ids == slow.token_ids and fast_ctx.token_ids == slow_ctx.token_ids
        assert slow.forward_passes == slow_calls == len(slow.token_ids)  # one pass per token
        assert fast.forward_passes == fast_calls and fast_calls * 3 < slow_calls
        assert fast.forced_tokens > len("customer_identification_number") and slow.forced_tokens == 0
        assert max(b["n_tokens"] for b in driver.stats.batches[-fast_calls:]) > 20  # a key in one pass
        assert fast.finish_reason == slow.finish_reason == "stop"
        # forced tokens were not sampled: no raw log-probability; under the constraint they are certain
        forced = [i for i, lp in enumerate(fast.logprobs) if math.isnan(lp)]
        assert len(forced) == fast.forced_tokens
        assert all(fast.allowed_logprobs[i] == 0.0 for i in forced)
        assert all(not math.isnan(lp) for lp in slow.logprobs)
        # the context holds the output; what the end of the constraint forced waits to be computed
        assert fast_ctx.token_ids[-len(fast.token_ids):] == fast.token_ids and fast_ctx.text.endswith(fast)
        assert fast_ctx.n_pending >= 1 and fast_ctx.kv_len + fast_ctx.n_pending == len(fast_ctx)


async def test_max_tokens_can_end_inside_forced_tokens():
    engine, driver = make_engine()
    async with engine:
        _, full, _ = await generate(engine, driver)
        for n in (1, 5, 12):
            ctx = engine.context()
            ctx.fill("Record:")
            cut = await ctx.generate(max_tokens=n, constrain=JsonSchema(SCHEMA))
            assert cut.finish_reason == "length" and len(cut.token_ids) == n
            assert cut.token_ids == full.token_ids[:n] and full.startswith(cut)
            assert ctx.text.endswith(cut)
            # the next generation continues from there
            more = await ctx.generate(max_tokens=3)
            assert len(more.token_ids) == 3


async def test_top_logprobs_of_forced_tokens_and_constraints_that_force_the_end():
    engine, _ = make_engine()
    async with engine:
        ctx = engine.context()
        ctx.fill("Say it:")
        result = await ctx.generate(max_tokens=50, constrain=Regex("hello world"), top_logprobs=2)
        assert result == "hello world" and result.finish_reason == "stop"
        # every token was forced: nothing was sampled, so nothing had to be computed yet
        assert result.forward_passes == 0 and result.forced_tokens == len("hello world")
        assert result.top_logprobs == [[(t, 0.0)] for t in result.token_ids]
        assert ctx.kv_len == 0 and ctx.text.endswith("Say it:hello world")
        # several constraints force their common prefix only
        ctx = engine.context()
        ctx.fill("Say it:")
        both = await ctx.generate(max_tokens=50, constrain=AllOf(Regex("hello (world|there)"), Regex("hel+o .*")))
        assert both in ("hello world", "hello there")
        assert len("hel") <= both.forced_tokens < len(both)  # "hel" forced by both, "lo " by one only
