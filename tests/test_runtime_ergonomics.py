"""The everyday API on FakeDriver: generate() returns a result object, fork(n) a list, and a
context is an async context manager that gives its pages back."""

from __future__ import annotations

import json

import pytest

from pie_local.driver.fake import FakeDriver
from pie_local.driver.types import DriverParams
from pie_local.runtime import GenerationResult, SamplingParams
from runtime_helpers import fake_engine


def make_engine():
    driver = FakeDriver(DriverParams(page_size=4, n_pages=64, max_batch_tokens=64))
    return fake_engine(driver)


async def test_generate_returns_text_that_carries_its_tokens_and_logprobs():
    async with make_engine() as engine:
        ctx = engine.context()
        ctx.fill("Once upon a time")
        result = await ctx.generate(SamplingParams(temperature=0.8, seed=3), max_tokens=6)
        assert isinstance(result, GenerationResult) and isinstance(result, str)
        assert result == ctx.last.text and result.text == ctx.last.text
        assert result.token_ids == ctx.last.token_ids and len(result.token_ids) == 6
        assert result.logprobs == ctx.last.logprobs and all(lp <= 0 for lp in result.logprobs)
        assert result.finish_reason == "length" and result.generation is ctx.last
        assert result.upper() == ctx.last.text.upper()  # still a str
        assert json.loads(json.dumps({"text": result})) == {"text": ctx.last.text}
        with pytest.raises(AttributeError):
            result.no_such_field  # noqa: B018


async def test_fork_always_returns_a_list_and_fork1_one_context():
    async with make_engine() as engine:
        ctx = engine.context()
        ctx.fill("shared prompt")
        await ctx.flush()
        [only] = ctx.fork(1)
        pair = ctx.fork(2)
        one = ctx.fork1()
        assert isinstance(pair, list) and len(pair) == 2
        for child in [only, *pair, one]:
            assert child is not ctx and child.token_ids == ctx.token_ids
            assert child.page_ids == ctx.page_ids  # shared, not copied
        with pytest.raises(ValueError, match="n >= 1"):
            ctx.fork(0)
        with pytest.raises(TypeError):
            ctx.fork()  # the count is required: there is no "one or a list" guess


async def test_async_with_releases_the_pages_at_the_end_of_the_block():
    async with make_engine() as engine:
        pool = engine.pool
        async with engine.context() as ctx:
            ctx.fill("a prompt that fills several pages")
            await ctx.generate(max_tokens=3)
            assert pool.n_used > 0
        assert pool.n_used == 0 and ctx.sequence.released
        with pytest.raises(RuntimeError, match="released"):
            ctx.fill("more")
        # leaving the block by an exception releases too
        with pytest.raises(KeyError):
            async with engine.context() as ctx2:
                ctx2.fill("another prompt")
                await ctx2.flush()
                raise KeyError("boom")
        assert pool.n_used == 0
