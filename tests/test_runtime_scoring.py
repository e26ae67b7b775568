"""Scoring on FakeDriver: score() is teacher forcing in one pass, select() scores forks in one batch,
and under a logit mask log-probabilities come raw and renormalised, top-k over allowed tokens only."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pie_local.driver.fake import FakeDriver
from pie_local.driver.types import DriverParams
from pie_local.runtime import SamplingParams
from pie_local.runtime.constraints import Regex
from runtime_helpers import fake_engine


def make_engine():
    driver = FakeDriver(DriverParams(page_size=4, n_pages=128, max_batch_tokens=64))
    return fake_engine(driver), driver


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def expected_logprobs(driver: FakeDriver, prefix: list[int], ids: list[int]) -> list[float]:
    """log p(ids[i] | prefix + ids[:i]) from the fake model's own logits."""
    out = []
    for i, t in enumerate(ids):
        visible = [(tok, pos) for pos, tok in enumerate(prefix + ids[:i])]
        out.append(float(log_softmax(driver.logits_for(visible))[t]))
    return out


async def test_score_is_teacher_forcing_in_one_pass_and_leaves_the_context_as_it_was():
    engine, driver = make_engine()
    async with engine:
        ctx = engine.context()
        ctx.fill("The answer is")
        await ctx.flush()
        before, calls = ctx.token_ids, driver.stats.calls
        result = await ctx.score(" forty-two")
        assert driver.stats.calls == calls + 1  # one forward pass for all ten tokens
        ids = engine.tokenizer.encode(" forty-two")
        assert result.token_ids == ids
        assert result.logprobs == pytest.approx(expected_logprobs(driver, before, ids), abs=1e-4)
        assert result.total == pytest.approx(sum(result.logprobs))
        assert result.mean == pytest.approx(result.total / len(ids))
        assert result.allowed_logprobs is None
        assert ctx.token_ids == before and ctx.kv_len >= len(before) - 1
        # a context with pending tokens is scored after them too
        ctx.fill(" really")
        pending = ctx.token_ids
        again = await ctx.score(ids)
        assert again.logprobs == pytest.approx(expected_logprobs(driver, pending, ids), abs=1e-4)
        assert ctx.token_ids == pending


async def test_score_under_a_constraint_reports_raw_and_renormalised_logprobs():
    engine, driver = make_engine()
    async with engine:
        ctx = engine.context()
        ctx.fill("Digits:")
        prefix = ctx.token_ids
        result = await ctx.score("12x", constrain=Regex("[0-9]+"))
        ids = engine.tokenizer.encode("12x")
        assert result.logprobs == pytest.approx(expected_logprobs(driver, prefix, ids), abs=1e-4)
        digits = [t for t in range(driver.info.n_vocab) if engine.tokenizer.piece(t, special=False).isdigit()]
        eos = [engine.tokenizer.eos_id]
        for i in range(2):  # "1" then "2": any digit is allowed (and, after one, the end)
            visible = [(tok, pos) for pos, tok in enumerate(prefix + ids[:i])]
            logits = driver.logits_for(visible).astype(np.float64)
            allowed = digits + (eos if i else [])
            want = logits[ids[i]] - np.log(np.exp(logits[allowed]).sum())
            assert result.allowed_logprobs[i] == pytest.approx(want, abs=1e-4)
            assert result.allowed_logprobs[i] > result.logprobs[i]
        assert result.allowed_logprobs[2] == -math.inf  # "x" leaves the regex


async def test_select_scores_every_option_in_one_batch_and_appends_the_best():
    engine, driver = make_engine()
    async with engine:
        ctx = engine.context()
        ctx.fill("Pick one:")
        prefix = ctx.token_ids
        options = [" red", " green", " a very long blue"]
        calls = driver.stats.calls
        chosen = await ctx.select(options)
        # one pass for the prompt, then one batch for the three options
        assert driver.stats.calls == calls + 2 and driver.stats.batches[-1]["n_requests"] == 3
        means = [np.mean(expected_logprobs(driver, prefix, engine.tokenizer.encode(o))) for o in options]
        assert [s.mean for s in chosen.scores] == pytest.approx(means, abs=1e-4)
        assert chosen.index == int(np.argmax(means)) and chosen.option == options[chosen.index]
        assert chosen.values == pytest.approx(means, abs=1e-4) and chosen.best is chosen.scores[chosen.index]
        assert ctx.token_ids == prefix + engine.tokenizer.encode(chosen.option)
        assert engine.pool.n_used == ctx.n_pages  # the forks gave their pages back
        # by total log-probability, the longest option is the least likely
        total = await engine.context().fill("Pick one:").select(options, normalize=False)
        totals = [s.total for s in total.scores]
        assert total.index == int(np.argmax(totals)) and total.index != 2
        with pytest.raises(ValueError, match="at least one"):
            await ctx.select([])


async def test_forward_top_k_respects_the_logit_mask():
    engine, driver = make_engine()
    async with engine:
        ctx = engine.context()
        ctx.fill("mask me")
        tok = engine.tokenizer
        allowed_ids = [tok.encode(c)[0] for c in "abc"]
        words = np.zeros((driver.info.n_vocab + 31) // 32, dtype=np.uint32)
        for t in allowed_ids:
            words[t >> 5] |= np.uint32(1 << (t & 31))
        out = await (ctx.forward().input(tok.encode("!")).sample(0, SamplingParams(), logit_mask=words)
                     .probe(0, top_k=5).execute())
        assert set(out.top_ids[0][:3].tolist()) == set(allowed_ids)
        assert out.top_probs[0][3:].tolist() == [0.0, 0.0]  # fewer allowed tokens than k
        assert float(out.top_probs[0].sum()) == pytest.approx(1.0, abs=1e-5)
        assert int(out.tokens[0]) == int(out.top_ids[0][0])  # greedy picks the best allowed token
        visible = [(t, p) for p, t in enumerate(ctx.token_ids)]
        logits = driver.logits_for(visible).astype(np.float64)
        token = int(out.tokens[0])
        assert out.logprobs[0] == pytest.approx(log_softmax(logits)[token], abs=1e-4)  # raw stays raw
        assert out.allowed_logprobs[0] == pytest.approx(logits[token] - np.log(np.exp(logits[allowed_ids]).sum()),
                                                        abs=1e-4)
        assert out.logits is None  # fetched for the renormalisation, not asked for


async def test_constrained_generation_reports_renormalised_logprobs_and_allowed_top_tokens():
    engine, _ = make_engine()
    async with engine:
        ctx = engine.context()
        ctx.fill("A number:")
        result = await ctx.generate(SamplingParams(temperature=1.0, seed=4), max_tokens=5,
                                    constrain=Regex("[0-9]{3}"), top_logprobs=4)
        assert len(result) == 3 and result.isdigit()
        assert len(result.allowed_logprobs) == len(result.logprobs) == len(result.token_ids) == 3
        for raw, renorm, top in zip(result.logprobs, result.allowed_logprobs, result.top_logprobs):
            assert renorm > raw  # ten allowed tokens carry less than all of the mass
            assert all(engine.tokenizer.piece(t, special=False).isdigit() for t, _ in top) and len(top) == 4
            assert math.exp(renorm) <= 1.0
        unconstrained = await engine.context().fill("A number:").generate(max_tokens=2, top_logprobs=2)
        assert unconstrained.allowed_logprobs == []
