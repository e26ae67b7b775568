"""The C sampler's fast paths against the reference semantics, token for token.

`reference_kept` and `reference_draw` restate sampler.c's reference in numpy, operation for operation: the same
float32 exponential, the same double sums in the same order (np.cumsum adds one term after
another), the same splitmix64 draw. The C sampler never materialises or sorts the whole
vocabulary and sums the mass in another order, so these tests pin that it still picks exactly
the reference's token for every seed, sampler shape, mask and edge case (ties at the cut, top_p
= 1, all mass in one token, -inf and NaN logits), and that rows sampled in parallel equal rows
sampled one by one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sampler_lib import SamplerLib, allow_mask

F = np.float32
MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------- the reference, in numpy

def exp_nonpos(x: np.ndarray) -> np.ndarray:
    """sampler.c's exp_nonpos on float32 arrays, one rounding per C operation."""
    x = np.where(x > F(-87.0), x, F(-87.0)).astype(F)
    k = (x * F(1.44269504) - F(0.5)).astype(np.int32)
    kf = k.astype(F)
    r = (x - kf * F(0.693145752)) - kf * F(1.42860677e-6)
    p = F(1.0) / F(720.0)
    for c in (F(1.0) / F(120.0), F(1.0) / F(24.0), F(1.0) / F(6.0), F(0.5), F(1.0), F(1.0)):
        p = p * r + c
    scale = ((k.astype(np.int64) + 127) << 23).astype(np.uint32).view(F)
    return (p * scale).astype(F)


def uniform01(seed: int) -> float:
    z = (seed + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return (z >> 11) * (1.0 / 9007199254740992.0)


def best_first(val: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return np.lexsort((ids, -val))  # larger value, then lower id


def reference_kept(logits: np.ndarray, *, temperature: float, top_k: int = 0, top_p: float = 1.0,
                   min_p: float = 0.0, mask: np.ndarray | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The tokens the reference draws from, in the order its draw walks them, with their values;
    a single token when the row is greedy (logit / temperature overflows)."""
    ok = np.isfinite(logits)
    if mask is not None:
        ids_all = np.arange(logits.size)
        ok &= ((mask[ids_all >> 5] >> (ids_all & 31)) & 1).astype(bool)
    ids = np.flatnonzero(ok)
    inv_t = F(1.0) / F(temperature)
    val = (logits[ids] * inv_t).astype(F)
    if not np.all(np.isfinite(val)):
        best = int(np.argmax(logits[ids]))
        return ids[best : best + 1], np.zeros(1, dtype=F)
    if 0 < top_k < ids.size:
        order = best_first(val, ids)[:top_k]
        ids, val = ids[order], val[order]
    if top_p < 1.0:
        z = np.cumsum(exp_nonpos(val - val.max()).astype(np.float64))[-1]
        order = best_first(val, ids)
        ids, val = ids[order], val[order]
        cum = np.cumsum(exp_nonpos(val - val.max()).astype(np.float64))
        reach = np.flatnonzero(cum >= float(F(top_p)) * z)
        n = reach[0] + 1 if reach.size else ids.size
        ids, val = ids[:n], val[:n]
    if min_p > 0.0:
        keep = val.astype(np.float64) >= float(val.max()) + math.log(float(F(min_p)))
        ids, val = ids[keep], val[keep]
    return ids, val


def reference_draw(kept: tuple[np.ndarray, np.ndarray], seed: int) -> int:
    ids, val = kept
    cum = np.cumsum(exp_nonpos(val - val.max()).astype(np.float64))
    hit = np.flatnonzero(uniform01(seed) * cum[-1] < cum)
    return int(ids[hit[0]] if hit.size else ids[-1])


def reference_token(logits: np.ndarray, *, seed: int = 0, **params) -> int:
    return reference_draw(reference_kept(logits, **params), seed)


def model_like_logits(n: int, seed: int) -> np.ndarray:
    """Logits shaped like a language model's: a broad low tail and a few hundred plausible tokens."""
    rng = np.random.default_rng(seed)
    x = rng.normal(-4.0, 2.0, n)
    head = rng.choice(n, 300, replace=False)
    x[head] = rng.normal(6.0, 2.5, 300)
    return x.astype(F)


SHAPES = [
    dict(temperature=0.8),
    dict(temperature=0.8, top_p=0.95),
    dict(temperature=1.3, top_p=0.5),
    dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.7, top_p=0.9, min_p=0.1),
    dict(temperature=2.0, top_k=5000),
]


# ---------------------------------------------------------------- the same token as the reference

def test_numpy_reference_reproduces_a_known_draw() -> None:
    # a self-check of the restatement: p = (0.5, 0.3, 0.2) and a seed whose u is known
    u = uniform01(7)
    logits = np.log(np.array([0.5, 0.3, 0.2])).astype(F)
    want = 0 if u < 0.5 else 1 if u < 0.8 else 2
    assert reference_token(logits, temperature=1.0, seed=7) == want
    np.testing.assert_allclose(exp_nonpos(np.array([0.0, -1.0, -10.0], dtype=F)), np.exp([0.0, -1.0, -10.0]), rtol=3e-7)


@pytest.mark.parametrize("params", SHAPES, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
@pytest.mark.parametrize("n_vocab", [262_144, 262_147, 1000])
def test_every_shape_draws_the_reference_token(sampler: SamplerLib, params: dict, n_vocab: int) -> None:
    logits = model_like_logits(n_vocab, n_vocab)
    kept = reference_kept(logits, **params)
    for seed in range(40):
        assert sampler.sample(logits, seed=seed, **params)[0] == reference_draw(kept, seed), seed


@pytest.mark.parametrize("params", SHAPES[:5], ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_masked_rows_draw_the_reference_token(sampler: SamplerLib, params: dict) -> None:
    n = 262_145
    logits = model_like_logits(n, 3)
    rng = np.random.default_rng(4)
    for allowed in (rng.choice(n, 20_000, replace=False), np.arange(1000, 1064), np.array([n - 1, 5])):
        mask = allow_mask(n, allowed)
        kept = reference_kept(logits, mask=mask, **params)
        for seed in range(15):
            got = sampler.sample(logits, seed=seed, mask=mask, **params)[0]
            assert got == reference_draw(kept, seed)
            assert got in set(allowed.tolist())


def test_flat_rows_draw_the_reference_token(sampler: SamplerLib) -> None:
    # a near-flat row: the nucleus holds most of the vocabulary, the cut reaches far
    logits = (np.random.default_rng(5).standard_normal(262_144) * 0.3).astype(F)
    for params in (dict(temperature=1.0, top_p=0.95), dict(temperature=1.0), dict(temperature=1.0, min_p=0.5)):
        kept = reference_kept(logits, **params)
        for seed in range(5):
            assert sampler.sample(logits, seed=seed, **params)[0] == reference_draw(kept, seed)


# ---------------------------------------------------------------- edge cases

def test_ties_at_the_top_p_cut_keep_the_lower_ids(sampler: SamplerLib) -> None:
    # eight equal logits: top_p 0.5 reaches its target exactly at the fourth, so ids 0-3 stay
    logits = np.full(8, 2.0, dtype=F)
    seen = {sampler.sample(logits, temperature=1.0, top_p=0.5, seed=s)[0] for s in range(400)}
    assert seen == {0, 1, 2, 3}
    # the same tie deep in a large vocabulary: the tied tokens straddle the cut
    big = np.full(262_144, -30.0, dtype=F)
    tied = np.array([7, 70_000, 131_072, 262_143])
    big[tied] = 5.0
    big[[11, 99_999]] = 5.5
    kept = reference_kept(big, temperature=1.0, top_p=0.6)
    assert kept[0].tolist() == [11, 99_999, 7, 70_000]  # the cut falls inside the tied group
    for s in range(60):
        assert sampler.sample(big, temperature=1.0, top_p=0.6, seed=s)[0] == reference_draw(kept, s)


def test_ties_at_the_top_k_boundary_keep_the_lower_ids(sampler: SamplerLib) -> None:
    logits = np.zeros(262_144, dtype=F)
    logits[[500, 9, 200_000, 64, 63]] = 1.0  # five tied best, top_k 3 keeps ids 9, 63, 64
    seen = {sampler.sample(logits, temperature=1.0, top_k=3, seed=s)[0] for s in range(300)}
    assert seen == {9, 63, 64}


def test_top_p_one_keeps_the_whole_distribution(sampler: SamplerLib) -> None:
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1])).astype(F)
    draws = [sampler.sample(logits, temperature=1.0, top_p=1.0, seed=s)[0] for s in range(4000)]
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / 4000, [0.4, 0.3, 0.2, 0.1], atol=0.025)
    big = model_like_logits(262_144, 8)
    kept = reference_kept(big, temperature=0.8)
    assert kept[0].size == big.size
    for s in range(20):
        assert sampler.sample(big, temperature=0.8, top_p=1.0, seed=s)[0] == reference_draw(kept, s)


def test_min_p_threshold_is_inclusive(sampler: SamplerLib) -> None:
    # min_p 1 keeps exactly the tokens tied with the max
    logits = np.array([1.0, 3.0, 3.0, 2.9], dtype=F)
    assert {sampler.sample(logits, temperature=1.0, min_p=1.0, seed=s)[0] for s in range(200)} == {1, 2}


def test_all_mass_in_one_token(sampler: SamplerLib) -> None:
    logits = np.full(262_144, -np.inf, dtype=F)
    logits[123_457] = 0.0
    for params in SHAPES:
        assert {sampler.sample(logits, seed=s, **params)[0] for s in range(20)} == {123_457}
    # a dominant token over a finite tail: e^-200 underflows, the tail never appears
    logits = np.full(262_144, -100.0, dtype=F)
    logits[42] = 100.0
    for params in SHAPES:
        assert {sampler.sample(logits, seed=s, **params)[0] for s in range(20)} == {42}


def test_minus_inf_and_nan_logits_are_never_drawn(sampler: SamplerLib) -> None:
    logits = model_like_logits(262_144, 9)
    logits[::3] = -np.inf
    logits[1::7] = np.nan
    bad = set(np.flatnonzero(~np.isfinite(logits)).tolist())
    for params in SHAPES:
        kept = reference_kept(logits, **params)
        for s in range(10):
            got = sampler.sample(logits, seed=s, **params)[0]
            assert got not in bad
            assert got == reference_draw(kept, s)


def test_overflowing_temperature_is_greedy_over_the_candidates(sampler: SamplerLib) -> None:
    logits = np.array([3.0e38, -1.0, 3.0e38, np.nan], dtype=F)
    assert sampler.sample(logits, temperature=0.5, top_p=0.9, seed=1)[0] == 0  # 3e38 / 0.5 overflows


# ---------------------------------------------------------------- many rows at once

@pytest.mark.parametrize("threads", [1, 2, 4])
def test_rows_in_parallel_equal_rows_one_by_one(sampler: SamplerLib, threads: int) -> None:
    n_rows, n = 9, 262_144
    logits = np.stack([model_like_logits(n, 100 + r) for r in range(n_rows)])
    samplers = [dict(SHAPES[r % len(SHAPES)], seed=r) for r in range(n_rows)]
    samplers[4] = dict(temperature=0.0)
    tokens, status, lps, ids, probs = sampler.sample_rows(logits, samplers, threads=threads, return_top=5)
    assert status.tolist() == [0] * n_rows
    for r in range(n_rows):
        token, lp, top_ids, top_probs = sampler.sample(logits[r], return_top=5, **samplers[r])
        assert tokens[r] == token and lps[r] == lp
        assert ids[r].tolist() == top_ids.tolist() and probs[r].tolist() == top_probs.tolist()


def test_a_nan_row_fails_alone(sampler: SamplerLib) -> None:
    n = 262_144
    logits = np.stack([model_like_logits(n, 1), np.full(n, np.nan, dtype=F), model_like_logits(n, 2)])
    samplers = [dict(temperature=0.8, top_p=0.95, seed=3)] * 3
    tokens, status, _, _, _ = sampler.sample_rows(logits, samplers, threads=2)
    assert status.tolist() == [0, -5, 0]
    assert tokens[0] == reference_token(logits[0], temperature=0.8, top_p=0.95, seed=3)
    assert tokens[2] == reference_token(logits[2], temperature=0.8, top_p=0.95, seed=3)
    with pytest.raises(ValueError, match="every logit is -inf or NaN"):
        sampler.sample(logits[1], temperature=0.8, top_p=0.95, seed=3)
