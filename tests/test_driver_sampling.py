"""Sampling through pie_forward: seeds, filters, bitmasks and probes, checked against the raw
logits the same call returns (so every check is exact, not statistical, where it can be)."""

from __future__ import annotations

import numpy as np
import pytest
from driver_helpers import Req, allow_mask, build_batch, log_softmax, tiny_gguf

from pie_local.driver import Driver, DriverParams, SamplingParams

pytestmark = pytest.mark.real_driver

PAGE = 8
N_DRAWS = 48  # output rows per call, all reading the same token row with different samplers


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    with Driver(tiny_gguf(tmp_path_factory, "llama"), DriverParams(n_threads=2, page_size=PAGE, n_pages=16)) as drv:
        yield drv


PROMPT = [1, 300, 301, 302, 400, 401, 17]


def sample(driver: Driver, samplers: list[SamplingParams], *, allowed=None, top_k: int = 0):
    """Runs PROMPT once with one output row per sampler, all on its last token."""
    n_vocab = driver.info.n_vocab
    masks = None
    if allowed is not None:
        masks = np.tile(allow_mask(n_vocab, allowed), (len(samplers), 1))
    last = len(PROMPT) - 1
    req = Req(PROMPT, [0], len(PROMPT), outputs=[last] * len(samplers), samplers=samplers)
    return driver.forward(build_batch([req], PAGE, top_k=top_k, logit_masks=masks))


def test_greedy_is_argmax_of_returned_logits(driver: Driver) -> None:
    res = sample(driver, [SamplingParams()] * 3, top_k=5)
    logits = res.logits[0]
    assert res.tokens.tolist() == [int(np.argmax(logits))] * 3
    np.testing.assert_allclose(res.logprobs, log_softmax(logits).max(), atol=1e-4)
    order = np.argsort(-logits, kind="stable")[:5]
    assert res.top_ids[0].tolist() == order.tolist()
    np.testing.assert_allclose(res.top_probs[0], np.exp(log_softmax(logits)[order]), rtol=1e-4)


def test_seeded_runs_reproduce_and_seeds_differ(driver: Driver) -> None:
    hot = [SamplingParams(temperature=2.0, seed=s) for s in range(N_DRAWS)]
    first, second = sample(driver, hot), sample(driver, hot)
    assert first.tokens.tolist() == second.tokens.tolist()
    assert len(set(first.tokens.tolist())) > N_DRAWS // 3  # hot sampling over ~560 tokens
    # different seed sets give different draws
    other = sample(driver, [SamplingParams(temperature=2.0, seed=1000 + s) for s in range(N_DRAWS)])
    assert other.tokens.tolist() != first.tokens.tolist()


def test_logprobs_are_under_raw_softmax(driver: Driver) -> None:
    res = sample(driver, [SamplingParams(temperature=1.5, seed=s) for s in range(N_DRAWS)], top_k=20)
    lsm = log_softmax(res.logits[0])
    np.testing.assert_allclose(res.logprobs, lsm[res.tokens], atol=1e-4)
    assert np.all(res.logprobs <= 0)
    sums = res.top_probs.sum(axis=1)
    assert np.all(sums <= 1 + 1e-5) and np.all(sums > 0)
    assert np.all(np.diff(res.top_probs, axis=1) <= 0)


@pytest.mark.parametrize(
    "params",
    [
        dict(top_k=3),
        dict(top_p=0.3),
        dict(min_p=0.2),
        dict(top_k=10, top_p=0.5, min_p=0.05),
    ],
    ids=["top_k", "top_p", "min_p", "all"],
)
def test_filters_never_return_an_excluded_token(driver: Driver, params: dict) -> None:
    temperature = 1.3
    res = sample(driver, [SamplingParams(temperature=temperature, seed=s, **params) for s in range(N_DRAWS)])
    logits = res.logits[0].astype(np.float64) / temperature
    order = np.argsort(-logits, kind="stable")
    keep = order
    if params.get("top_k"):
        keep = keep[: params["top_k"]]
    if params.get("top_p"):
        p = np.exp(logits[keep] - logits[keep].max())
        p /= p.sum()
        keep = keep[: int(np.searchsorted(np.cumsum(p), params["top_p"]) + 1)]
    if params.get("min_p"):
        keep = keep[logits[keep] >= logits[keep].max() + np.log(params["min_p"])]
    drawn = set(res.tokens.tolist())
    assert drawn <= set(keep.tolist()), f"drew {drawn - set(keep.tolist())} outside {sorted(keep.tolist())}"
    assert len(keep) < 0.5 * driver.info.n_vocab  # the filter really excluded something


@pytest.mark.parametrize(
    "params",
    [
        dict(),
        dict(temperature=1.0),
        dict(temperature=5.0, top_k=50),
        dict(temperature=1.0, top_p=0.9),
        dict(temperature=1.0, min_p=0.01),
    ],
    ids=["greedy", "temperature", "top_k", "top_p", "min_p"],
)
def test_logit_bitmask_always_respected(driver: Driver, params: dict) -> None:
    rng = np.random.default_rng(11)
    allowed = rng.choice(driver.info.n_vocab, size=25, replace=False)
    res = sample(driver, [SamplingParams(seed=s, **params) for s in range(N_DRAWS)], allowed=allowed)
    assert set(res.tokens.tolist()) <= set(allowed.tolist())
    if not params:  # greedy under a mask = argmax over the allowed tokens
        best = allowed[np.argmax(res.logits[0][allowed])]
        assert res.tokens.tolist() == [int(best)] * N_DRAWS
    # the logits returned are raw: the mask did not touch them
    assert np.all(np.isfinite(res.logits))


def test_temperature_sampling_follows_the_distribution(driver: Driver) -> None:
    """Over many seeds, the empirical frequency of the top token matches its probability."""
    counts: dict[int, int] = {}
    n = 0
    for base in range(0, 20 * N_DRAWS, N_DRAWS):
        res = sample(driver, [SamplingParams(temperature=1.0, top_k=2, seed=base + s) for s in range(N_DRAWS)])
        for t in res.tokens.tolist():
            counts[t] = counts.get(t, 0) + 1
        n += N_DRAWS
    logits = res.logits[0].astype(np.float64)
    top2 = np.argsort(-logits, kind="stable")[:2]
    p0 = 1.0 / (1.0 + np.exp(logits[top2[1]] - logits[top2[0]]))
    assert set(counts) <= set(top2.tolist())
    assert abs(counts.get(int(top2[0]), 0) / n - p0) < 0.05  # n = 960: 4+ standard deviations
