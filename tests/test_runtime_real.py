"""The runtime on the real driver and the starter model (Gemma 3 270M Q4_K_M)."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = [pytest.mark.real_driver, pytest.mark.slow]

PROMPT = "The capital of France is"


def _driver_available() -> bool:
    try:
        from pie_local.driver import Driver  # noqa: F401
    except Exception:
        return False
    return True


if not _driver_available():
    pytestmark.append(pytest.mark.skip(reason="the native driver is not built"))


def engine_for(path, **kw):
    from pie_local.driver.types import DriverParams
    from pie_local.runtime import Engine, EngineConfig

    return Engine(str(path), EngineConfig(driver=DriverParams(n_pages=64, n_threads=2, **kw)))


@pytest.mark.llama_cpp
async def test_greedy_generation_equals_llama_cpp(starter_gguf):
    from llama_ref import LlamaRef

    n_new = 24
    # plain weights and ggml's kernels, as the reference: a 6-token prompt takes gemv on the repacked
    # q4_K matrices here and vec_dot there (repacked weights: test_driver_repack.py)
    async with engine_for(starter_gguf, repack=False, own_kernels=False) as engine:
        ctx = engine.context()
        ctx.fill(PROMPT)
        prompt_ids = ctx.token_ids
        text = await ctx.generate(max_tokens=n_new)
        ours = ctx.last.token_ids
        eos = engine.tokenizer.eos_ids
    with LlamaRef(starter_gguf, n_ctx=256) as ref:
        assert ref.tokenize(PROMPT) == prompt_ids
        theirs = ref.greedy(prompt_ids, n_new)
        ref_text = ref.detokenize([t for t in theirs if t not in eos][: len(ours)])
    cut = next((i for i, t in enumerate(theirs) if t in eos), len(theirs))
    assert ours == theirs[:cut]
    assert text == ref_text and len(text) > 10


async def test_snapshot_restart_continues_identically_without_reprefill(starter_gguf):
    from pie_local.runtime import Context, SamplingParams

    sampling = SamplingParams(temperature=0.7, top_k=40, seed=5)
    async with engine_for(starter_gguf) as engine:
        ctx = engine.context()
        ctx.fill("Once upon a time, in a small village by the sea, there lived")
        await ctx.generate(max_tokens=6)
        await ctx.save("story")
        expected = await ctx.generate(sampling, max_tokens=10)
        expected_ids = ctx.last.token_ids
    async with engine_for(starter_gguf) as engine:
        restored = await Context.open(engine, "story")
        got = await restored.generate(sampling, max_tokens=10)
        assert restored.last.token_ids == expected_ids and got == expected
        # one forward token per generated token: the prompt was never computed again
        assert engine.stats().tokens_total == len(expected_ids)
    import json

    from pie_local import paths

    # the model file was hashed once for both engines: the second remembered it by (path, size, mtime)
    assert len(json.loads((paths.home() / "model-sha256.json").read_text())) == 1


async def test_forks_share_the_prompt_and_match_unforked_greedy(starter_gguf):
    async with engine_for(starter_gguf, page_size=16) as engine:
        base = engine.context()
        base.fill("List three colours of the rainbow: red,")
        await base.flush()
        kids = base.fork(3)
        outs = await asyncio.gather(*(k.generate(max_tokens=8) for k in kids))
        assert outs[0] == outs[1] == outs[2]
        before = engine.stats().tokens_total
        fresh = engine.context()
        fresh.fill("List three colours of the rainbow: red,")
        assert await fresh.generate(max_tokens=8) == outs[0]
        # the fresh context adopted the cached full pages and computed only the partial tail
        n = len(fresh.token_ids) - 8  # prompt tokens
        assert engine.stats().tokens_total - before == n - 16 * ((n - 1) // 16) + 7


async def test_json_schema_constrained_generation_parses(starter_gguf):
    import json

    from pie_local.runtime import SamplingParams
    from pie_local.runtime.constraints import JsonSchema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    async with engine_for(starter_gguf) as engine:
        for seed in range(2):
            ctx = engine.context()
            ctx.fill("A person described as JSON:")
            text = await ctx.generate(SamplingParams(temperature=0.8, seed=seed), max_tokens=60,
                                      constrain=JsonSchema(schema))
            value = json.loads(text)
            assert set(value) == {"name", "age"} and 0 <= value["age"] <= 120
            assert ctx.last.finish_reason == "stop"


async def test_batched_requests_see_only_their_own_kv(starter_gguf):
    """Three contexts probed in one batch give the logits each gets alone."""
    import numpy as np

    prompts = ["The capital of France is", "def fibonacci(n):", "Roses are red, violets are"]
    async with engine_for(starter_gguf) as engine:
        ctxs = [engine.context() for _ in prompts]
        for ctx, p in zip(ctxs, prompts):
            ctx.fill(p)
            await ctx.flush()  # one at a time: no batching here
        forks = [c.fork1() for c in ctxs]
        batched = await asyncio.gather(*(f.forward().input([506]).probe(0, logits=True).execute() for f in forks))
        assert engine.stats().max_batch_requests == 3
        for ctx, together in zip(ctxs, batched):
            alone = await ctx.forward().input([506]).probe(0, logits=True).execute()
            diff = float(np.abs(alone.logits - together.logits).max())
            assert diff < 0.05, diff
            assert int(alone.logits.argmax()) == int(together.logits.argmax())
