"""Speculation in generate() on FakeDriver: drafts verified in one pass, exact for greedy decoding,
distribution-preserving for sampling; acceptance counted in ctx.last and the engine's stats."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pie_local.driver.fake import FakeDriver, FakeTokenizer
from pie_local.driver.types import DriverParams
from pie_local.runtime import GuessDrafter, ModelDrafter, NgramDrafter, SamplingParams
from pie_local.runtime.constraints import Regex
from pie_local.runtime.speculation import Draft, accept_drafts, find_draft, sampling_distribution
from runtime_helpers import fake_engine

TOK = FakeTokenizer()
TEXT = "one two three four five six seven eight nine ten " * 3


def repeating(visible: list[int]) -> int | None:
    """A model that continues TEXT, as a model quoting its prompt would."""
    seen = TOK.decode(visible[1:])
    return TOK.encode(TEXT[len(seen) % len(TEXT)])[0] if seen else None


def make_engine(rule=None):
    driver = FakeDriver(DriverParams(page_size=4, n_pages=512, max_batch_tokens=128), next_token=rule)
    return fake_engine(driver), driver


async def generate(engine, prompt: str, **kw):
    ctx = engine.context()
    ctx.fill(prompt)
    result = await ctx.generate(**kw)
    ctx.release()
    return result


async def test_greedy_with_an_ngram_drafter_is_greedy_in_fewer_passes():
    engine, driver = make_engine(repeating)
    async with engine:
        plain = await generate(engine, TEXT[:60], max_tokens=60)
        calls = driver.stats.calls
        fast = await generate(engine, TEXT[:60], max_tokens=60, speculator=NgramDrafter(3), draft_tokens=8)
        assert fast == plain and fast.token_ids == plain.token_ids and fast.logprobs == pytest.approx(plain.logprobs)
        assert fast.forward_passes == driver.stats.calls - calls < 60 / 4
        assert fast.accepted_tokens >= 40 and fast.drafted_tokens >= fast.accepted_tokens
        assert plain.drafted_tokens == plain.accepted_tokens == 0
        stats = engine.stats()
        assert (stats.drafted_tokens, stats.accepted_tokens) == (fast.drafted_tokens, fast.accepted_tokens)


async def test_wrong_drafts_cost_passes_not_correctness():
    engine, _ = make_engine()  # the fake model's own pseudo-random text
    async with engine:
        plain = await generate(engine, "Hello", max_tokens=20)

        def nonsense(tokens: list[int], k: int) -> list[int]:  # a function is a drafter too
            return [TOK.encode("~")[0]] * k

        spec = await generate(engine, "Hello", max_tokens=20, speculator=nonsense, top_logprobs=2)
        assert spec.token_ids == plain.token_ids and spec.accepted_tokens <= 2
        assert len(spec.top_logprobs) == len(spec.token_ids) and all(len(t) == 2 for t in spec.top_logprobs)
        # stop strings and max_tokens cut inside an accepted draft
        engine2, _ = make_engine(repeating)
        async with engine2:
            cut = await generate(engine2, TEXT[:60], max_tokens=50, stop=["eight"], speculator=NgramDrafter())
            assert cut.endswith("seven ") and cut.stop == "eight" and "eight" not in cut
            exact = await generate(engine2, TEXT[:60], max_tokens=7, speculator=NgramDrafter())
            assert len(exact.token_ids) == 7
        with pytest.raises(ValueError, match="constrain"):
            await generate(engine, "x", speculator=NgramDrafter(), constrain=Regex("a+"))
        with pytest.raises(TypeError, match="propose"):
            await generate(engine, "x", speculator=42)


async def test_the_context_holds_exactly_the_accepted_tokens():
    engine, _ = make_engine(repeating)
    async with engine:
        ctx = engine.context()
        ctx.fill(TEXT[:60])
        prompt = ctx.token_ids
        out = await ctx.generate(max_tokens=30, speculator=NgramDrafter())
        assert ctx.token_ids == prompt + out.token_ids
        assert ctx.kv_len == len(ctx) - 1  # rejected drafts' KV was dropped, the last token waits
        more = await ctx.generate(max_tokens=10)  # and the next generation continues correctly
        reference = await generate(engine, TEXT[:60], max_tokens=40)
        assert out.token_ids + more.token_ids == reference.token_ids


async def test_guess_and_model_drafters():
    engine, _ = make_engine(repeating)
    draft_engine, _ = make_engine(repeating)  # a second "model" that happens to agree
    async with engine, draft_engine:
        plain = await generate(engine, TEXT[:20], max_tokens=24)
        guess = GuessDrafter(TOK.encode(TEXT[20:34] + "XXXXXXXX"))  # right for 14 tokens, then wrong
        guessed = await generate(engine, TEXT[:20], max_tokens=24, speculator=guess, draft_tokens=6)
        assert guessed.token_ids == plain.token_ids
        # two drafts of six kept, each followed by the model's own token: the 14 tokens guessed right
        assert guessed.accepted_tokens == 12 and guessed.drafted_tokens > 12
        drafter = ModelDrafter(draft_engine)
        drafted = await generate(engine, TEXT[:20], max_tokens=24, speculator=drafter, draft_tokens=4)
        assert drafted.token_ids == plain.token_ids
        assert drafted.accepted_tokens == drafted.drafted_tokens  # the same model: every draft kept
        assert drafted.forward_passes <= 24 / 5 + 1
        drafter.release()
        assert draft_engine.pool.n_used == 0


# ---- the sampling rule -----------------------------------------------------------------------------

def test_find_draft_and_the_ngram_drafter():
    assert find_draft([1, 2, 3, 9, 1, 2, 3], 3, 2) == [9, 1]
    assert find_draft([5, 6, 7, 6], 3, 4) == [7, 6]
    assert find_draft([1, 2, 3], 3, 4) == []
    with pytest.raises(ValueError):
        NgramDrafter(0)


@pytest.mark.parametrize("stochastic", [False, True])
def test_the_acceptance_rule_preserves_the_target_distribution(stochastic):
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    q = np.array([0.1, 0.1, 0.6, 0.1, 0.1])
    counts = Counter()
    n = 40_000
    for _ in range(n):
        x = int(rng.choice(5, p=q)) if stochastic else 2  # a point-mass drafter always says 2
        kept, replacement = accept_drafts([x], lambda i: p, q[None, :] if stochastic else None, rng)
        counts[x if kept else replacement] += 1
    freq = np.array([counts[i] / n for i in range(5)])
    np.testing.assert_allclose(freq, p, atol=0.01)


def test_sampling_distribution_filters():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.06, 0.04], dtype=np.float32))
    full = sampling_distribution(logits, SamplingParams(temperature=1.0))
    np.testing.assert_allclose(full, [0.4, 0.3, 0.2, 0.06, 0.04], atol=1e-6)
    np.testing.assert_allclose(sampling_distribution(logits, SamplingParams(temperature=1.0, top_k=2)),
                               [4 / 7, 3 / 7, 0, 0, 0], atol=1e-6)
    top_p = sampling_distribution(logits, SamplingParams(temperature=1.0, top_p=0.75))
    np.testing.assert_allclose(top_p, [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0, 0], atol=1e-6)
    min_p = sampling_distribution(logits, SamplingParams(temperature=1.0, min_p=0.5))
    np.testing.assert_allclose(min_p, [4 / 7, 3 / 7, 0, 0, 0], atol=1e-6)
    assert sampling_distribution(logits, SamplingParams()).tolist() == [1, 0, 0, 0, 0]


async def test_speculative_sampling_has_the_distribution_of_plain_sampling():
    """Two tokens after a fixed prompt, drawn many times with and without a drafter whose guesses
    are often right: both match the exact distribution the fake model defines."""
    engine, driver = make_engine()
    sampling = SamplingParams(temperature=1.5, top_k=3)
    async with engine:
        ctx = engine.context()
        ctx.fill("Once")
        prompt = ctx.token_ids
        ctx.release()
        visible = lambda ids: [(t, i) for i, t in enumerate(prompt + ids)]  # noqa: E731
        exact: dict[tuple[int, int], float] = {}
        p1 = sampling_distribution(driver.logits_for(visible([])), sampling)
        for a in np.flatnonzero(p1):
            p2 = sampling_distribution(driver.logits_for(visible([int(a)])), sampling)
            for b in np.flatnonzero(p2):
                exact[int(a), int(b)] = float(p1[a] * p2[b])

        def second_best(tokens: list[int], k: int) -> list[int]:
            """Drafts the second most likely token twice: right often, wrong often."""
            ids = tokens[len(prompt) - 1 :][1:]
            first = int(np.argsort(-driver.logits_for(visible(ids)))[1])
            then = int(np.argsort(-driver.logits_for(visible(ids + [first])))[1])
            return [first, then][:k]

        n = 600
        seen = {"plain": Counter(), "speculative": Counter()}
        accepted = 0
        for seed in range(n):
            for name, speculator in (("plain", None), ("speculative", second_best)):
                out = await generate(engine, "Once", max_tokens=2, sampling=sampling.with_seed(seed),
                                     speculator=speculator)
                seen[name][tuple(out.token_ids)] += 1
                accepted += out.accepted_tokens
        assert accepted > n / 4  # the drafter was right often enough to matter
        for name, counts in seen.items():
            tv = 0.5 * sum(abs(counts[k] / n - v) for k, v in exact.items())
            assert tv < 0.09, (name, tv)


def test_a_draft_object_with_the_drafters_distribution():
    draft = Draft([1, 2], probs=np.full((2, 5), 0.2))
    kept, replacement = accept_drafts(draft.tokens, lambda i: np.array([0, 0.5, 0.5, 0, 0]), draft.probs,
                                      np.random.default_rng(1))
    assert kept == 2 and replacement is None  # p/q = 2.5 >= 1: always kept
