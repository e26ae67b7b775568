"""Bad input: each gives its own status and message, the process survives, and the same Driver
keeps working. Every bad batch would overwrite the pages of a live sequence if it got past
validation, so comparing that sequence's logits before and after proves nothing was written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from driver_helpers import Req, allow_mask, build_batch, tiny_gguf
from driver_rules import BAD_BATCHES, DECODE, N_PAGES, PAGE, PARAMS, PROMPT, with_batch
from tiny_models import ARCHES, write_shape_mismatch, write_truncated, write_unknown_arch, write_wrong_magic

from pie_local.driver import Driver, DriverError, DriverParams, supported_architectures

pytestmark = pytest.mark.real_driver


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

@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A driver holding PROMPT in pages 0-2, and the logits of one decode step on top of it."""
    with Driver(tiny_gguf(tmp_path_factory, "llama"), PARAMS) as drv:
        drv.forward(build_batch([Req(PROMPT, [0, 1, 2], len(PROMPT))], PAGE))
        baseline = drv.forward(build_batch([DECODE], PAGE)).logits
        yield drv, baseline


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


def test_native_driver_is_a_model_driver(live) -> None:
    from pie_local.driver import ModelDriver

    assert isinstance(live[0], ModelDriver)
