"""The C sampler on its own: sampler.c and status.c (its last error) compiled into a small
library, called through ctypes.

These run without the driver or a model, so sampling bugs show up here first and precisely;
tests/test_driver_sampling.py checks the same rules end to end through pie_forward.
"""

from __future__ import annotations

import numpy as np
import pytest
from sampler_lib import SamplerLib, allow_mask

PIE_ERR_INVALID_ARGUMENT = -5


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def test_allow_mask_layout() -> None:
    # bit (id % 32) of word (id / 32), as pie_driver.h specifies
    mask = allow_mask(70, [0, 33, 69])
    assert mask.tolist() == [1, 2, 1 << 5]


def test_greedy_is_argmax_and_ties_go_to_lowest_id(sampler: SamplerLib) -> None:
    logits = np.array([0.5, 3.0, -1.0, 3.0, 2.0], dtype=np.float32)
    assert sampler.sample(logits)[0] == 1
    rng = np.random.default_rng(1)
    big = rng.standard_normal(262_144).astype(np.float32)
    assert sampler.sample(big)[0] == int(np.argmax(big))


def test_greedy_respects_mask(sampler: SamplerLib) -> None:
    logits = np.array([5.0, 4.0, 3.0, 2.0], dtype=np.float32)
    assert sampler.sample(logits, mask=allow_mask(4, [2, 3]))[0] == 2


def test_logprob_and_top_k_use_raw_logits(sampler: SamplerLib) -> None:
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal(5000) * 3).astype(np.float32)
    ref = log_softmax(logits)
    # masked and tempered sampling still reports probabilities of the raw distribution
    mask = allow_mask(5000, np.arange(0, 5000, 7))
    token, logprob, ids, probs = sampler.sample(logits, temperature=0.7, seed=3, mask=mask, return_top=10)
    assert token % 7 == 0
    assert logprob == pytest.approx(ref[token], abs=1e-5)
    order = np.lexsort((np.arange(5000), -logits))[:10]
    assert ids.tolist() == order.tolist()
    np.testing.assert_allclose(probs, np.exp(ref[order]), rtol=1e-5)
    assert np.all(np.diff(probs) <= 0)


@pytest.mark.parametrize("scale", [0.5, 3.0, 40.0])
def test_logprob_matches_float64_on_a_full_vocabulary(sampler: SamplerLib, scale: float) -> None:
    # the log-sum-exp runs in float with a polynomial exp: it must stay within 1e-4 of float64,
    # from flat rows (every term counts) to peaked ones (most terms underflow)
    rng = np.random.default_rng(int(scale * 10))
    logits = (rng.standard_normal(262_145) * scale).astype(np.float32)  # odd length: a scalar tail
    ref = log_softmax(logits)
    for token in [int(np.argmax(logits)), int(np.argmin(logits)), 12_345, 262_144]:
        mask = allow_mask(logits.size, [token])
        _, logprob, ids, probs = sampler.sample(logits, mask=mask, return_top=5)
        assert logprob == pytest.approx(ref[token], abs=1e-4)
        np.testing.assert_allclose(probs, np.exp(ref[ids]), rtol=1e-4, atol=1e-9)


def test_logprob_ignores_nan_and_minus_inf_entries(sampler: SamplerLib) -> None:
    rng = np.random.default_rng(11)
    logits = rng.standard_normal(70_000).astype(np.float32)
    logits[::5] = -np.inf
    logits[1::7] = np.nan
    token, logprob, _, _ = sampler.sample(logits)
    finite = np.where(np.isfinite(logits), logits, -np.inf)
    assert token == int(np.argmax(finite))
    assert logprob == pytest.approx(log_softmax(finite[np.isfinite(finite)]).max(), abs=1e-5)


def test_greedy_on_a_full_vocabulary_skips_non_finite_and_keeps_lowest_tie(sampler: SamplerLib) -> None:
    rng = np.random.default_rng(12)
    logits = rng.standard_normal(262_144).astype(np.float32)
    logits[1000] = np.inf  # +inf and NaN are never candidates
    logits[2000] = np.nan
    logits[[70_001, 5_003, 262_143]] = 9.0  # ties in different SIMD lanes and in the tail
    assert sampler.sample(logits)[0] == 5_003
    odd = logits[:262_143 - 8]  # the tail past the last whole block holds the only maximum
    odd[-1] = 10.0
    assert sampler.sample(odd)[0] == odd.size - 1


def test_greedy_under_a_mask_on_a_full_vocabulary(sampler: SamplerLib) -> None:
    rng = np.random.default_rng(13)
    logits = rng.standard_normal(262_143).astype(np.float32)  # last mask word is partial
    allowed = rng.choice(262_143, size=5000, replace=False)
    allowed = np.append(allowed, 262_142)
    mask = allow_mask(logits.size, allowed)
    assert sampler.sample(logits, mask=mask)[0] == int(allowed[np.argmax(logits[allowed])])
    logits[262_142] = 50.0
    assert sampler.sample(logits, mask=mask)[0] == 262_142
    # bits past n_vocab in the last word are ignored, even when set
    tail = mask.copy()
    tail[-1] = 0xFFFFFFFF
    logits[262_142] = -np.inf
    now_allowed = np.union1d(allowed, np.arange(262_112, 262_143))
    assert sampler.sample(logits, mask=tail)[0] == int(now_allowed[np.argmax(logits[now_allowed])])


def test_seed_reproduces_and_seeds_differ(sampler: SamplerLib) -> None:
    rng = np.random.default_rng(4)
    logits = rng.standard_normal(1000).astype(np.float32)
    draws = [sampler.sample(logits, temperature=1.0, seed=s)[0] for s in range(200)]
    again = [sampler.sample(logits, temperature=1.0, seed=s)[0] for s in range(200)]
    assert draws == again
    assert len(set(draws)) > 100  # a near-flat distribution over 1000 tokens


def test_draws_follow_the_distribution(sampler: SamplerLib) -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    counts = np.bincount([sampler.sample(logits, temperature=1.0, seed=s)[0] for s in range(20_000)], minlength=4)
    np.testing.assert_allclose(counts / 20_000, [0.5, 0.3, 0.15, 0.05], atol=0.015)


def test_temperature_sharpens(sampler: SamplerLib) -> None:
    logits = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)
    hot = [sampler.sample(logits, temperature=5.0, seed=s)[0] for s in range(2000)]
    cold = [sampler.sample(logits, temperature=0.1, seed=s)[0] for s in range(2000)]
    assert hot.count(0) < 800 < 1900 < cold.count(0)


def test_top_k_never_leaves_the_k_best(sampler: SamplerLib) -> None:
    rng = np.random.default_rng(5)
    logits = rng.standard_normal(262_144).astype(np.float32)
    best = set(np.argsort(-logits)[:5].tolist())
    seen = {sampler.sample(logits, temperature=2.0, top_k=5, seed=s)[0] for s in range(300)}
    assert seen <= best and len(seen) == 5


def test_top_p_keeps_smallest_prefix_reaching_p(sampler: SamplerLib) -> None:
    probs = np.array([0.4, 0.3, 0.2, 0.06, 0.04])
    logits = np.log(probs).astype(np.float32)
    # 0.4 + 0.3 = 0.7 < 0.75, so the prefix is {0, 1, 2}
    seen = {sampler.sample(logits, temperature=1.0, top_p=0.75, seed=s)[0] for s in range(500)}
    assert seen == {0, 1, 2}
    # on a big flat-ish vocabulary the prefix must grow past the first 128 entries
    rng = np.random.default_rng(6)
    big = (rng.standard_normal(50_000) * 0.1).astype(np.float32)
    order = np.argsort(-big.astype(np.float64), kind="stable")
    p = np.exp(log_softmax(big))[order]
    n_keep = int(np.searchsorted(np.cumsum(p), 0.5) + 1)
    allowed = set(order[:n_keep].tolist())
    seen = {sampler.sample(big, temperature=1.0, top_p=0.5, seed=s)[0] for s in range(100)}
    assert seen <= allowed and n_keep > 128


def test_min_p_drops_unlikely_tokens(sampler: SamplerLib) -> None:
    probs = np.array([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = np.log(probs).astype(np.float32)
    # min_p 0.15 keeps p >= 0.075: tokens 0, 1, 2
    seen = {sampler.sample(logits, temperature=1.0, min_p=0.15, seed=s)[0] for s in range(500)}
    assert seen == {0, 1, 2}


def test_filters_compose_in_order(sampler: SamplerLib) -> None:
    probs = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
    logits = np.log(probs).astype(np.float32)
    # top_k 4 -> {0..3} renormalised (0.333, 0.278, 0.222, 0.167); top_p 0.6 -> {0, 1}
    seen = {sampler.sample(logits, temperature=1.0, top_k=4, top_p=0.6, seed=s)[0] for s in range(500)}
    assert seen == {0, 1}


def test_mask_respected_in_every_mode(sampler: SamplerLib) -> None:
    rng = np.random.default_rng(7)
    logits = rng.standard_normal(3000).astype(np.float32)
    allowed = rng.choice(3000, size=40, replace=False)
    mask = allow_mask(3000, allowed)
    for params in [
        dict(),
        dict(temperature=1.0),
        dict(temperature=3.0, top_k=10),
        dict(temperature=1.0, top_p=0.3),
        dict(temperature=1.0, min_p=0.5),
    ]:
        for s in range(50):
            assert sampler.sample(logits, mask=mask, seed=s, **params)[0] in allowed


def test_vanishing_temperature_is_greedy(sampler: SamplerLib) -> None:
    logits = np.array([30.0, 29.0, -5.0, 29.5], dtype=np.float32)
    assert {sampler.sample(logits, temperature=1e-38, seed=s)[0] for s in range(20)} == {0}


def test_non_finite_logits_are_never_drawn(sampler: SamplerLib) -> None:
    logits = np.array([np.nan, -np.inf, 1.0, 0.5], dtype=np.float32)
    assert sampler.sample(logits)[0] == 2
    assert {sampler.sample(logits, temperature=1.0, seed=s)[0] for s in range(100)} == {2, 3}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (dict(temperature=1.0, top_k=-1), "top_k must be >= 0"),
        (dict(temperature=1.0, top_p=0.0), "top_p must be in (0, 1]"),
        (dict(temperature=1.0, top_p=1.5), "top_p must be in (0, 1]"),
        (dict(temperature=1.0, min_p=-0.1), "min_p must be in [0, 1]"),
        (dict(temperature=float("nan")), "temperature must be finite"),
        (dict(return_top=11), "returned top_k must be in [0, n_vocab=10]"),
    ],
)
def test_bad_parameters_are_rejected(sampler: SamplerLib, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=rf"^{PIE_ERR_INVALID_ARGUMENT}: .*{__import__('re').escape(message)}"):
        sampler.sample(np.zeros(10, dtype=np.float32), **params)


def test_mask_allowing_nothing_is_an_error(sampler: SamplerLib) -> None:
    with pytest.raises(ValueError, match="allows no token"):
        sampler.sample(np.zeros(40, dtype=np.float32), mask=np.zeros(2, dtype=np.uint32))


@pytest.mark.parametrize("params", [dict(temperature=0.7), dict(temperature=1.3, top_k=4),
                                    dict(temperature=1.0, top_p=0.8), dict(temperature=0.9, min_p=0.2),
                                    dict(temperature=1.2, top_k=6, top_p=0.9, min_p=0.05)])
def test_the_runtimes_numpy_distribution_is_the_samplers(sampler: SamplerLib, params: dict) -> None:
    """Speculative sampling verifies drafts against runtime.speculation.sampling_distribution: it
    must be the distribution this sampler draws from."""
    from pie_local.driver.types import SamplingParams
    from pie_local.runtime.speculation import sampling_distribution

    logits = np.random.default_rng(7).standard_normal(12).astype(np.float32) * 1.5
    want = sampling_distribution(logits, SamplingParams(**params))
    n = 20_000
    counts = np.bincount([sampler.sample(logits, seed=s, **params)[0] for s in range(n)], minlength=12)
    np.testing.assert_allclose(counts / n, want, atol=0.015)
    assert set(np.flatnonzero(counts)) == set(np.flatnonzero(want))  # the same support
