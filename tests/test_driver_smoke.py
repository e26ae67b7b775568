"""Quick checks of the native driver and its binding on the starter model (the full suite lives
in test_driver_*.py): library + ABI, model info, exact page-layout invariance, batch-of-requests
consistency, validation that leaves the KV pool untouched, page round trips, and silence on
stderr."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pie_local.driver import Driver, DriverError, DriverParams, ForwardBatch, SamplingParams, _ffi, _lib

pytestmark = pytest.mark.real_driver

PAGE = 8
PROMPT = [2, 651, 6037, 529, 9405, 563, 8341, 236761, 669, 3622, 532, 9405, 563, 496, 1535, 3417, 236764]


def one_request(tokens, pages, kv_len, *, outputs=None, positions=None, masks=None) -> ForwardBatch:
    """A single-request batch whose new tokens are the last len(tokens) of kv_len."""
    n = len(tokens)
    n_pages = -(-kv_len // PAGE)
    outputs = list(range(n)) if outputs is None else outputs
    batch = ForwardBatch(
        tokens=np.array(tokens),
        positions=np.array(positions if positions is not None else range(kv_len - n, kv_len)),
        qo_indptr=np.array([0, n]),
        kv_page_indices=np.array(pages[:n_pages]),
        kv_page_indptr=np.array([0, n_pages]),
        kv_last_page_len=np.array([kv_len - (n_pages - 1) * PAGE]),
        output_rows=np.array(outputs),
        samplers=[SamplingParams()] * len(outputs),
        return_logits=True,
    )
    if masks is not None:
        batch.mask_indptr = np.cumsum([0] + [len(m) for m in masks])
        batch.mask_runs = np.array([x for m in masks for x in m])
    return batch


@pytest.fixture(scope="module")
def driver(starter_gguf):
    with Driver(starter_gguf, DriverParams(n_threads=2, page_size=PAGE, n_pages=64, max_batch_tokens=64)) as d:
        yield d


def test_library_abi_matches_binding() -> None:
    lib = _lib.load()
    assert lib.pie_abi_version() == _ffi.ABI_VERSION
    for which, layout in _ffi.STRUCTS.items():
        assert lib.pie_struct_size(which) == ctypes.sizeof(layout)
    assert lib.pie_struct_size(99) == 0
    assert lib.pie_status_name(-5) == b"invalid_argument"
    names = [lib.pie_arch_name(i) for i in range(lib.pie_arch_count())]
    assert b"gemma3" in names and len(set(names)) == len(names)
    assert lib.pie_arch_name(-1) is None and lib.pie_arch_name(len(names)) is None


def test_info_describes_the_starter_model(driver: Driver) -> None:
    info = driver.info
    assert (info.arch, info.n_vocab, info.n_embd, info.n_layer) == ("gemma3", 262144, 640, 18)
    assert (info.n_head, info.n_head_kv, info.head_dim, info.sliding_window) == (4, 1, 256, 512)
    assert info.backend == "CPU" and info.kv_type == "f16"
    # one page: 18 layers x (K + V) x 8 rows x 256 f16 values
    assert info.page_bytes == 18 * 2 * PAGE * 256 * 2
    assert info.kv_bytes == info.page_bytes * 64
    assert 200_000_000 < info.weight_bytes < 300_000_000


def test_scattered_pages_give_identical_logits(driver: Driver) -> None:
    n = len(PROMPT)
    contiguous = driver.forward(one_request(PROMPT, [0, 1, 2], n)).logits
    scattered = driver.forward(one_request(PROMPT, [40, 7, 23], n)).logits
    assert np.array_equal(contiguous, scattered)
    # greedy continuation of "... 9405 563" predicts the same token the model chose before
    assert contiguous.shape == (n, 262144) and np.isfinite(contiguous).all()


def two_requests(first, second, pages_first, pages_second) -> ForwardBatch:
    n1, n2 = len(first), len(second)
    return ForwardBatch(
        tokens=np.array(first + second),
        positions=np.array(list(range(n1)) + list(range(n2))),
        qo_indptr=np.array([0, n1, n1 + n2]),
        kv_page_indices=np.array(pages_first + pages_second),
        kv_page_indptr=np.array([0, len(pages_first), len(pages_first) + len(pages_second)]),
        kv_last_page_len=np.array([n1 - (len(pages_first) - 1) * PAGE, n2 - (len(pages_second) - 1) * PAGE]),
        output_rows=np.arange(n1 + n2),
        samplers=[SamplingParams()] * (n1 + n2),
        return_logits=True,
    )


def test_batched_requests_do_not_affect_each_other(driver: Driver) -> None:
    a, b = PROMPT[:5], PROMPT[3:]
    ab = driver.forward(two_requests(a, b, [20], [21, 22])).logits
    ba = driver.forward(two_requests(b, a, [23, 24], [25])).logits
    # attention runs per request: order and page placement change nothing, bit for bit
    assert np.array_equal(ab, np.concatenate([ba[len(b) :], ba[: len(b)]]))
    # and each request alone gets the very same logits (test_driver_invariance.py has the rest)
    alone_a = driver.forward(one_request(a, [10], len(a))).logits
    alone_b = driver.forward(one_request(b, [11, 12], len(b))).logits
    assert np.array_equal(ab, np.concatenate([alone_a, alone_b]))


def test_mask_hiding_a_span_equals_never_seeing_it(driver: Driver) -> None:
    # Sequence X = P[:4] + P[4:9] + P[9:12]; hide P[4:9] from the last three tokens and compare
    # with the sequence P[:4] + P[9:12] at the same positions.
    head, span, tail = PROMPT[:4], PROMPT[4:9], PROMPT[9:12]
    driver.forward(one_request(head + span, [30, 31], 9, outputs=[0]))
    masks = [[0, 4, 5, 3]] * 3  # visible 4, hidden 5, visible 3 (causality still hides later rows)
    got = driver.forward(one_request(tail, [30, 31], 12, masks=masks)).logits
    want = driver.forward(
        one_request(head + tail, [32], 7, positions=[0, 1, 2, 3, 9, 10, 11], outputs=[4, 5, 6])
    ).logits
    # exact: attention skips the hidden rows, so it sums what it would sum without them
    assert np.array_equal(got, want)


def test_bad_batches_fail_clearly_and_leave_the_pool_alone(driver: Driver) -> None:
    driver.forward(one_request(PROMPT[:6], [50], 6, outputs=[5]))
    before = driver.read_pages([50])
    cases = [
        (one_request(PROMPT[:3], [900], 3), "request 0: page id 900 out of range (n_pages=64)"),
        (
            one_request(PROMPT * 4, [50, 51, 52, 53, 54, 55, 56, 57, 58], 68),
            "batch has 68 tokens; max_batch_tokens is 64",
        ),
        (
            one_request(PROMPT[:2], [50], 2, masks=[[0, 2], [0, 1]]),
            "token 1: mask runs sum to 1 but the request's KV length is 2",
        ),
        (one_request([300000], [50], 1), "token 0: id 300000 out of range (n_vocab=262144)"),
    ]
    for batch, message in cases:
        with pytest.raises(DriverError) as err:
            driver.forward(batch)
        assert err.value.status == "invalid_argument"
        assert err.value.message == message
    assert driver.read_pages([50]) == before


def test_page_round_trip_and_copy(driver: Driver) -> None:
    driver.forward(one_request(PROMPT[:8], [60], 8, outputs=[7]))
    data = driver.read_pages([60])
    assert len(data) == driver.info.page_bytes and any(data)
    driver.write_pages([61], data)
    driver.copy_pages([60], [62])
    assert driver.read_pages([61, 62]) == data + data
    with pytest.raises(DriverError, match="write of 1 pages needs exactly"):
        driver.write_pages([61], data[:-1])
    with pytest.raises(DriverError, match="source page 0: id -1 out of range"):
        driver.copy_pages([-1], [3])


def test_load_errors_name_the_problem(tmp_path) -> None:
    missing = tmp_path / "none.gguf"
    with pytest.raises(DriverError) as err:
        Driver(missing)
    assert err.value.status == "io" and "none.gguf" in err.value.message
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(DriverError) as err:
        Driver(junk)
    assert err.value.status == "format" and "not a GGUF file" in err.value.message
    with pytest.raises(DriverError, match="kv_type must be one of"):
        Driver(junk, DriverParams(kv_type="q4"))


def test_nothing_reaches_stderr(starter_gguf) -> None:
    code = textwrap.dedent(
        f"""
        import numpy as np
        from pie_local.driver import Driver, DriverParams, ForwardBatch, SamplingParams
        with Driver({str(starter_gguf)!r}, DriverParams(n_pages=4, page_size=8)) as d:
            b = ForwardBatch(tokens=np.array([2, 651]), positions=np.array([0, 1]), qo_indptr=np.array([0, 2]),
                kv_page_indices=np.array([0]), kv_page_indptr=np.array([0, 1]), kv_last_page_len=np.array([2]),
                output_rows=np.array([1]), samplers=[SamplingParams()])
            print(int(d.forward(b).tokens[0]))
        try:
            Driver("/nonexistent.gguf")
        except Exception as e:
            print(type(e).__name__)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    token, error = proc.stdout.split()
    assert 0 <= int(token) < 262144 and error == "DriverError"


def test_q8_0_kv_pool(starter_gguf) -> None:
    n = len(PROMPT)
    params = DriverParams(n_threads=2, page_size=PAGE, n_pages=16, kv_type="q8_0")
    with Driver(starter_gguf, params) as d:
        assert d.info.kv_type == "q8_0"
        assert d.info.page_bytes == 18 * 2 * PAGE * (256 // 32) * 34  # q8_0: 34 bytes per 32 values
        contiguous = d.forward(one_request(PROMPT, [0, 1, 2], n)).logits
        scattered = d.forward(one_request(PROMPT, [9, 4, 6], n)).logits
    assert np.array_equal(contiguous, scattered)  # gathered rows are re-quantized losslessly
    with Driver(starter_gguf, DriverParams(n_threads=2, page_size=PAGE, n_pages=16)) as d:
        f16 = d.forward(one_request(PROMPT, [0, 1, 2], n)).logits
    assert (contiguous.argmax(1) == f16.argmax(1)).mean() >= 0.8
