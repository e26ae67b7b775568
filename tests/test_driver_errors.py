"""Bad input: each gives its own status and message, the process survives, and the same Driver
keeps working. Every bad batch would overwrite the pages of a live sequence if it got past
validation, so comparing that sequence's logits before and after proves nothing was written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from driver_helpers import Req, allow_mask, build_batch, tiny_gguf
from tiny_models import ARCHES, write_shape_mismatch, write_truncated, write_unknown_arch, write_wrong_magic

from pie_local.driver import Driver, DriverError, DriverParams, SamplerParams, supported_architectures

pytestmark = pytest.mark.real_driver

PAGE = 4
MAX_TOKENS = 32
N_PAGES = 16
PARAMS = DriverParams(n_threads=2, page_size=PAGE, n_pages=N_PAGES, max_batch_tokens=MAX_TOKENS)

# ---------------------------------------------------------------------------------------------
# Files that must not load
# ---------------------------------------------------------------------------------------------


def expect_load_error(path: Path, status: str, *fragments: str) -> DriverError:
    with pytest.raises(DriverError) as err:
        Driver(path, PARAMS)
    assert err.value.status == status, err.value
    for fragment in fragments:
        assert fragment in err.value.message, err.value.message
    return err.value


def test_missing_file(tmp_path: Path) -> None:
    expect_load_error(tmp_path / "nope.gguf", "io", "cannot open", "nope.gguf")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    expect_load_error(tmp_path, "io", "not a regular file")


def test_truncated_file(tmp_path: Path, tmp_path_factory) -> None:
    good = tiny_gguf(tmp_path_factory, "llama")
    expect_load_error(write_truncated(good, tmp_path / "cut.gguf", 0.6), "format", "truncated")
    # cut inside the metadata: still a clean format error, not a crash
    expect_load_error(write_truncated(good, tmp_path / "cut2.gguf", 0.002), "format", "cut2.gguf")


def test_wrong_magic(tmp_path: Path, tmp_path_factory) -> None:
    expect_load_error(
        write_wrong_magic(tiny_gguf(tmp_path_factory, "llama"), tmp_path / "m.gguf"), "format", "not a GGUF"
    )


def test_unknown_architecture(tmp_path: Path) -> None:
    err = expect_load_error(write_unknown_arch(tmp_path / "u.gguf"), "unsupported", "pie-unknown-arch", "llama")
    # the message lists the driver's own table
    assert f"(supported: {', '.join(supported_architectures())})" in err.message


def test_every_supported_architecture_has_a_tiny_model() -> None:
    # the tests cover each row of the driver's architecture table with a tiny model
    assert supported_architectures() == ARCHES


def test_tensor_shape_mismatch(tmp_path: Path) -> None:
    expect_load_error(write_shape_mismatch(tmp_path / "s.gguf"), "format", "blk.0.attn_q.weight", "shape")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.gguf").write_bytes(b"")
    err = expect_load_error(tmp_path / "empty.gguf", "format")
    assert "empty.gguf" in err.message


# ---------------------------------------------------------------------------------------------
# Bad batches and page operations on a live driver
# ---------------------------------------------------------------------------------------------

PROMPT = [1, 300, 301, 302, 303, 304, 305, 306, 307, 308]  # pages 0, 1, 2 (2 tokens in page 2)
DECODE = Req([309], [0, 1, 2], len(PROMPT) + 1, outputs=[0])


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A driver holding PROMPT in pages 0-2, and the logits of one decode step on top of it."""
    with Driver(tiny_gguf(tmp_path_factory, "llama"), PARAMS) as drv:
        drv.forward(build_batch([Req(PROMPT, [0, 1, 2], len(PROMPT))], PAGE))
        baseline = drv.forward(build_batch([DECODE], PAGE)).logits
        yield drv, baseline


def clobber() -> Req:
    """A valid request that would overwrite pages 0 and 1 with other tokens."""
    return Req([1, 5, 6, 7, 8, 9, 10, 11], [0, 1], 8, outputs=[7])


def with_batch(req: Req | None = None, **changes):
    batch = build_batch([req or clobber()], PAGE)
    return dataclasses.replace(batch, **changes)


def i32(*xs: int) -> np.ndarray:
    return np.asarray(xs, dtype=np.int32)


# name -> (make(n_vocab) -> bad ForwardBatch, fragment of the expected message)
BAD_BATCHES = {
    "page_id_out_of_range": (
        lambda v: with_batch(Req([1, 5, 6, 7, 8], [0, N_PAGES + 3], 5)),
        f"page id {N_PAGES + 3} out of range (n_pages={N_PAGES})",
    ),
    "negative_page_id": (lambda v: with_batch(Req([1, 5], [-1], 2)), "page id -1 out of range"),
    "mask_runs_do_not_sum_to_kv_len": (
        lambda v: with_batch(Req([1, 5, 6], [0], 3, masks=[None, None, [0, 2]])),
        "mask runs sum to 2 but the request's KV length is 3",
    ),
    "mask_indptr_wrong_length": (
        lambda v: with_batch(mask_indptr=i32(0, 0), mask_runs=i32()),
        "mask_indptr has 2 entries",
    ),
    "too_many_tokens": (
        lambda v: with_batch(Req(list(range(3, 3 + MAX_TOKENS + 1)), list(range(9)), MAX_TOKENS + 1)),
        f"batch has {MAX_TOKENS + 1} tokens; max_batch_tokens is {MAX_TOKENS}",
    ),
    "token_id_out_of_range": (lambda v: with_batch(Req([1, 5, 100_000], [0], 3)), "id 100000 out of range (n_vocab="),
    "last_page_len_zero": (lambda v: with_batch(kv_last_page_len=i32(0)), "last_page_len 0 outside 1..4"),
    "last_page_len_too_big": (lambda v: with_batch(kv_last_page_len=i32(5)), "last_page_len 5 outside 1..4"),
    "kv_shorter_than_new_tokens": (
        lambda v: with_batch(Req([1, 5, 6, 7, 8, 9], [0], 4, positions=list(range(6)))),
        "KV length 4 is shorter than its 6 new tokens",
    ),
    "page_listed_twice": (lambda v: with_batch(Req([1, 5, 6, 7, 8], [0, 0], 5)), "page 0 listed twice"),
    "output_row_out_of_range": (lambda v: with_batch(output_rows=i32(8)), "row 8 out of range (batch has 8 tokens)"),
    "qo_indptr_not_ending_at_n_tokens": (lambda v: with_batch(qo_indptr=i32(0, 7)), "qo_indptr ends at 7"),
    "top_p_zero": (
        lambda v: with_batch(samplers=[SamplerParams(temperature=1.0, top_p=0.0)]),
        "top_p must be in (0, 1]",
    ),
    "min_p_above_one": (
        lambda v: with_batch(samplers=[SamplerParams(temperature=1.0, min_p=2.0)]),
        "min_p must be in [0, 1]",
    ),
    "negative_top_k": (lambda v: with_batch(samplers=[SamplerParams(temperature=1.0, top_k=-3)]), "top_k must be >= 0"),
    "nan_temperature": (
        lambda v: with_batch(samplers=[SamplerParams(temperature=float("nan"))]),
        "temperature must be finite",
    ),
    "logit_mask_allows_nothing": (
        lambda v: with_batch(logit_masks=np.zeros((1, (v + 31) // 32), dtype=np.uint32)),
        "allows no token",
    ),
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_bad_batch_is_rejected_and_driver_stays_usable(live, case: str) -> None:
    drv, baseline = live
    make, fragment = BAD_BATCHES[case]
    batch = make(drv.info.n_vocab)
    with pytest.raises(DriverError) as err:
        drv.forward(batch)
    assert err.value.status == "invalid_argument", err.value
    assert fragment in err.value.message, err.value.message
    after = drv.forward(build_batch([DECODE], PAGE)).logits
    np.testing.assert_array_equal(after, baseline)


def test_mask_allowing_only_one_token_is_fine(live) -> None:
    drv, _ = live
    res = drv.forward(with_batch(logit_masks=allow_mask(drv.info.n_vocab, [42])[None, :]))
    assert res.tokens.tolist() == [42]
    drv.forward(build_batch([Req(PROMPT, [0, 1, 2], len(PROMPT))], PAGE))  # restore pages 0-1


@pytest.mark.parametrize(
    ("op", "fragment"),
    [
        (lambda d: d.copy_pages([0], [N_PAGES]), f"id {N_PAGES} out of range"),
        (lambda d: d.copy_pages([-2], [3]), "id -2 out of range"),
        (lambda d: d.copy_pages([0, 1], [3]), "2 sources and 1 destinations"),
        (lambda d: d.read_pages([N_PAGES + 1]), "out of range"),
        (lambda d: d.write_pages([3], b"\0" * 10), "needs exactly"),
        (lambda d: d.write_pages([N_PAGES], b"\0" * d.info.page_bytes), "out of range"),
    ],
    ids=["copy_dst", "copy_src", "copy_lengths", "read", "write_size", "write_id"],
)
def test_bad_page_operation(live, op, fragment: str) -> None:
    drv, baseline = live
    with pytest.raises(DriverError) as err:
        op(drv)
    assert err.value.status == "invalid_argument" and fragment in err.value.message, err.value
    np.testing.assert_array_equal(drv.forward(build_batch([DECODE], PAGE)).logits, baseline)


def test_bad_params_are_rejected(tmp_path_factory) -> None:
    path = tiny_gguf(tmp_path_factory, "llama")
    for params, fragment in [
        (DriverParams(page_size=0), "page_size 0 outside"),
        (DriverParams(n_pages=0), "n_pages must be >= 1"),
        (DriverParams(kv_type="q3"), "kv_type must be one of"),
        (DriverParams(device="tpu:7"), "tpu:7"),
    ]:
        with pytest.raises(DriverError) as err:
            Driver(path, params)
        assert fragment in err.value.message, err.value


def test_closed_driver_refuses_calls(tmp_path_factory) -> None:
    drv = Driver(tiny_gguf(tmp_path_factory, "llama"), PARAMS)
    drv.close()
    with pytest.raises(DriverError, match="closed"):
        drv.forward(build_batch([Req([1, 2], [0], 2)], PAGE))
    drv.close()  # idempotent
