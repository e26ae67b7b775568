"""Embeddings on FakeDriver: each pooling reads the rows it should (also across the scheduler's
chunks), the file's pooling type is the default, vectors are unit length unless asked otherwise,
many inputs share batches, pages are given back, and bad inputs are refused before anything runs."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pie_local.driver.fake import FakeDriver
from pie_local.driver.types import DriverParams
from pie_local.runtime import ContextLengthError, Embedding
from runtime_helpers import fake_engine


def make_engine(max_batch_tokens: int = 64):
    driver = FakeDriver(DriverParams(page_size=4, n_pages=256, max_batch_tokens=max_batch_tokens))
    return fake_engine(driver), driver


def hidden_rows(driver: FakeDriver, ids: list[int]) -> np.ndarray:
    """The fake model's final hidden state of every token of ``ids`` (causal attention)."""
    n_embd = driver.info.n_embd
    return np.stack([driver.logits_for([(t, p) for p, t in enumerate(ids[: i + 1])])[:n_embd]
                     for i in range(len(ids))])


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
async def test_each_pooling_reads_its_rows_even_across_chunks(pooling):
    engine, driver = make_engine(max_batch_tokens=16)  # 50 tokens: four chunks
    ids = list(range(5, 55))
    async with engine:
        e = await engine.embed(ids, pooling=pooling, normalize=False)
        assert engine.pool.n_used == 0  # the input's context was released
    rows = hidden_rows(driver, ids)
    want = {"mean": rows.mean(axis=0), "cls": rows[0], "last": rows[-1]}[pooling]
    assert isinstance(e, Embedding) and e.pooling == pooling and e.n_tokens == 50 and not e.normalized
    np.testing.assert_allclose(e.vector, want, rtol=1e-6, atol=1e-6)
    assert e.vector.dtype == np.float32 and e.vector.shape == (driver.info.n_embd,)


async def test_normalized_by_default_and_text_takes_the_models_special_tokens():
    engine, driver = make_engine()
    async with engine:
        text = await engine.embed("hello")
        ids = engine.tokenizer.encode("hello", add_special=True, parse_special=False)
        raw = await engine.embed(ids, normalize=False)
    assert ids[0] == engine.tokenizer.bos_id and text.n_tokens == len(ids)
    assert text.normalized and abs(float(np.linalg.norm(text.vector)) - 1.0) < 1e-6
    np.testing.assert_allclose(text.vector, raw.vector / np.linalg.norm(raw.vector), rtol=1e-6)
    assert text.tolist() == [float(x) for x in text.vector]


async def test_many_inputs_are_computed_in_the_same_batches():
    engine, driver = make_engine()
    texts = ["one", "two", "three", "one"]
    async with engine:
        before = driver.stats.calls
        many = await engine.embed_many(texts)
        calls = driver.stats.calls - before
        singles = [await engine.embed(t) for t in texts]
        assert engine.pool.n_used == 0
    assert calls == 1  # four short inputs, one batch
    assert driver.stats.batches[-1]["head"] is False  # embeddings alone: no LM head, nothing sampled
    for a, b in zip(many, singles):
        assert np.array_equal(a.vector, b.vector)
    assert np.array_equal(many[0].vector, many[3].vector) and not np.array_equal(many[0].vector, many[1].vector)


@pytest.mark.parametrize(("stored", "pooling"), [("1", "mean"), ("2", "cls"), ("3", "last"), ("0", "mean")])
async def test_the_files_pooling_type_is_the_default(stored, pooling):
    engine, driver = make_engine()
    driver.tokenizer.meta["fake.pooling_type"] = stored
    async with engine:
        e = await engine.embed("abc")
        assert e.pooling == pooling
        assert (await engine.embed("abc", pooling="cls")).pooling == "cls"  # asked for: wins


async def test_a_rerankers_pooling_is_refused():
    engine, driver = make_engine()
    driver.tokenizer.meta["fake.pooling_type"] = "4"
    async with engine:
        with pytest.raises(ValueError, match="'rank'"):
            await engine.embed("abc")


@pytest.mark.parametrize(("inputs", "error", "match"), [
    ([], ValueError, "empty"),
    ([[]], ValueError, "no tokens"),
    ([[5, 10_000]], ValueError, "out of range"),
    ([[5, -1]], ValueError, "out of range"),
    ([3.5], TypeError, "string or a list of token ids"),
    ([["a", "b"]], TypeError, "string or a list of token ids"),
    ("abc", TypeError, "takes a list of inputs"),
    (["x" * 5000], ContextLengthError, "trained context"),  # refused, never truncated
])
async def test_bad_inputs_are_refused_before_anything_runs(inputs, error, match):
    engine, driver = make_engine()
    async with engine:
        before = driver.stats.calls
        with pytest.raises(error, match=match):
            await engine.embed_many(inputs)
        with pytest.raises(ValueError, match="pooling must be one of"):
            await engine.embed("abc", pooling="max")
        assert driver.stats.calls == before and engine.pool.n_used == 0


async def test_inferlets_embed_in_contexts_they_own():
    engine, driver = make_engine()

    async def main(rt, args):
        return [e.tolist() for e in await rt.embed_many(["a", "b"], pooling="last")]

    async with engine:
        got = await engine.run(main)
        want = await engine.embed_many(["a", "b"], pooling="last")
    assert got == [e.tolist() for e in want]


async def test_embeddings_batched_with_a_generation_run_the_head_for_it_only():
    """A batch that also samples a token runs the LM head; the embedding is the same either way."""
    engine, driver = make_engine()
    async with engine:
        alone = await engine.embed("abc", pooling="last")
        ctx = engine.context()
        ctx.fill("xyz")
        both = await asyncio.gather(engine.embed("abc", pooling="last"), ctx.generate(max_tokens=2))
        ctx.release()
    assert any(b["head"] and b["n_requests"] == 2 for b in driver.stats.batches)
    assert np.array_equal(both[0].vector, alone.vector) and len(both[1].token_ids) >= 1
