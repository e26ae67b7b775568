"""Threads through the real driver: "auto" (n_threads <= 0) picks the cores the process may use,
an explicit count is kept, and sampling rows in parallel changes no token."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from driver_helpers import Req, build_batch, tiny_gguf

from pie_local.driver import Driver, DriverParams, SamplingParams

pytestmark = pytest.mark.real_driver

PAGE = 8
PROMPT = [1, 300, 301, 302, 400, 401, 17]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf(tmp_path_factory, "llama")


def run(driver: Driver, samplers: list[SamplingParams]):
    """PROMPT once, one output row per sampler on its last token."""
    req = Req(PROMPT, [0], len(PROMPT), outputs=[len(PROMPT) - 1] * len(samplers), samplers=samplers)
    return driver.forward(build_batch([req], PAGE, top_k=4))


def test_explicit_counts_are_kept(model: Path) -> None:
    with Driver(model, DriverParams(n_threads=1, page_size=PAGE, n_pages=4)) as drv:
        for _ in range(20):
            run(drv, [SamplingParams()])
        assert drv.threads == 1


def test_auto_starts_from_the_cores_allowed(model: Path) -> None:
    with Driver(model, DriverParams(n_threads=0, page_size=PAGE, n_pages=4)) as drv:
        assert 1 <= drv.threads <= len(os.sched_getaffinity(0))


def test_auto_follows_the_affinity_mask(model: Path) -> None:
    code = (
        "import os, sys; from pie_local.driver import Driver, DriverParams; "
        "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
        "print(Driver(sys.argv[1], DriverParams(n_threads=0, page_size=8, n_pages=4)).threads)"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, str(model)], check=True, capture_output=True, text=True, env=env)
    assert out.stdout.split()[-1] == "1"


def test_rows_sampled_in_parallel_draw_the_same_tokens(model: Path) -> None:
    # enough rows x vocabulary that two threads share them; every row its own seed and filters
    samplers = [SamplingParams(temperature=[0.0, 0.8, 1.3, 2.0][s % 4], top_k=[0, 0, 20, 0][s % 4],
                               top_p=[1.0, 0.95, 0.9, 1.0][s % 4], min_p=[0.0, 0.0, 0.05, 0.1][s % 4], seed=s)
                for s in range(160)]  # fmt: skip
    results = []
    for threads in (1, 2):
        with Driver(model, DriverParams(n_threads=threads, page_size=PAGE, n_pages=4)) as drv:
            assert drv.info.n_vocab * len(samplers) >= 65_536  # the sampler's threshold for threads
            results.append(run(drv, samplers))
    one, two = results
    np.testing.assert_array_equal(one.logits, two.logits)  # ggml's threads split rows, not sums
    assert one.tokens.tolist() == two.tokens.tolist()
    np.testing.assert_array_equal(one.logprobs, two.logprobs)
    np.testing.assert_array_equal(one.top_ids, two.top_ids)
    assert len(set(one.tokens.tolist())) > 20  # the rows really sampled different tokens


@pytest.mark.slow
def test_starter_logits_do_not_depend_on_the_thread_count(starter_gguf: Path) -> None:
    # "auto" may change the count between passes: it must never change a result
    prompt = [2] + list(range(1000, 1100))
    logits = []
    for threads in (1, 2):
        with Driver(starter_gguf, DriverParams(n_threads=threads, page_size=32, n_pages=64)) as drv:
            prefill = drv.forward(build_batch([Req(prompt, [0, 1, 2, 3], len(prompt))], 32))
            streams = [Req(prompt[:39] + [7 + s], [8 + 4 * s, 9 + 4 * s], 40) for s in range(8)]
            logits.append((prefill.logits, drv.forward(build_batch(streams, 32)).logits))
    np.testing.assert_array_equal(logits[0][0], logits[1][0])
    np.testing.assert_array_equal(logits[0][1], logits[1][1])
