"""Bad input: each gives its own status and message, the process survives, and the same Driver
keeps working. Every bad batch would overwrite the pages of a live sequence if it got past
validation, so comparing that sequence's logits before and after proves nothing was written."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from driver_helpers import Req, allow_mask, build_batch, tiny_gguf
from driver_rules import (BAD_BATCHES, DECODE, N_PAGES, NAN_TOKEN, PAGE, PARAMS, POISONED_ROW_ERROR, PROMPT,
                          poisoned_batch, with_batch)
from tiny_models import (ARCHES, ENCODERS, write_shape_mismatch, write_tiny_gguf, write_truncated, write_unknown_arch,
                         write_wrong_magic)

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
    # the tests cover each row of the driver's architecture table with a tiny model (decoders,
    # then the embedding models of write_tiny_encoder)
    assert supported_architectures() == ARCHES + ENCODERS


def test_tensor_shape_mismatch(tmp_path: Path) -> None:
    expect_load_error(write_shape_mismatch(tmp_path / "s.gguf"), "format", "blk.0.attn_q.weight", "shape")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.gguf").write_bytes(b"")
    err = expect_load_error(tmp_path / "empty.gguf", "format")
    assert "empty.gguf" in err.message


@pytest.mark.parametrize(
    ("overrides", "key", "shown"),
    [
        ({"rms_eps": float("nan")}, "llama.attention.layer_norm_rms_epsilon", "nan"),
        ({"rms_eps": -1e-5}, "llama.attention.layer_norm_rms_epsilon", "-1e-05"),
        ({"rope_base": 0.0}, "llama.rope.freq_base", "is 0;"),
        ({"rope_base": float("inf")}, "llama.rope.freq_base", "inf"),
        ({"rope_base": -10000.0}, "llama.rope.freq_base", "-10000"),
        ({"rope_factor": -4.0}, "llama.rope.scaling.factor", "-4"),
        ({"rope_factor": float("nan")}, "llama.rope.scaling.factor", "nan"),
    ],
    ids=["rms_eps_nan", "rms_eps_negative", "rope_base_zero", "rope_base_inf", "rope_base_negative",
         "rope_factor_negative", "rope_factor_nan"],
)
def test_bad_hyper_parameter(tmp_path: Path, overrides: dict, key: str, shown: str) -> None:
    path = write_tiny_gguf(tmp_path / "bad.gguf", "llama", **overrides)
    expect_load_error(path, "format", f"metadata key '{key}' is", shown, "must be finite")


def test_unknown_rope_scaling_type(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "dynamic.gguf", "llama", rope_scaling="dynamic", rope_factor=4.0)
    expect_load_error(path, "unsupported", "RoPE scaling type 'dynamic' is not supported", "yarn", "longrope")


@pytest.mark.parametrize("dtype", [np.int32, np.float64])
def test_weight_type_ggml_cannot_multiply(tmp_path: Path, dtype) -> None:
    # i32 and f64 are valid GGUF tensor types, but ggml has no kernel to multiply them by: the
    # forward pass would abort the process in the middle of the graph
    def hook(name: str, t: np.ndarray) -> np.ndarray:
        return t.astype(dtype) if name == "blk.1.ffn_up.weight" else t

    path = write_tiny_gguf(tmp_path / "int.gguf", "llama", tensor_hook=hook)
    type_name = np.dtype(dtype).name.replace("int", "i").replace("float", "f")
    expect_load_error(path, "unsupported", f"tensor 'blk.1.ffn_up.weight' has type {type_name}", "cannot multiply")


def test_more_threads_than_cpus_run_with_a_warning(tmp_path_factory, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="pie_local.driver")
    online = os.cpu_count()
    with Driver(tiny_gguf(tmp_path_factory, "llama"), dataclasses.replace(PARAMS, n_threads=100_000)) as drv:
        drv.forward(build_batch([Req(PROMPT, [0, 1, 2], len(PROMPT))], PAGE))
    assert f"n_threads 100000 is more than the {online} CPUs online; using {online}" in caplog.text


def test_file_replaced_while_loading_loads_the_file_that_was_opened(tmp_path: Path, tmp_path_factory) -> None:
    """The driver opens the file once: replacing it (a download moving a new file into place)
    after its metadata was read must not pair that metadata with the new file's tensor data."""
    first = tiny_gguf(tmp_path_factory, "llama")
    other = write_tiny_gguf(tmp_path / "other.gguf", "qwen3", seed=7, name="tiny-other")
    path = tmp_path / "model.gguf"
    shutil.copyfile(first, path)
    other_bytes = other.read_bytes()

    class ReplaceAfterMetadata(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "read the metadata of" in record.getMessage():
                os.replace(other, path)

    handler = ReplaceAfterMetadata(level=logging.DEBUG)
    logger = logging.getLogger("pie_local.driver")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        replaced = Driver(path, PARAMS)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert path.read_bytes() == other_bytes  # the file was replaced while the driver loaded it
    with replaced, Driver(first, PARAMS) as original:
        assert replaced.info == original.info
        batch = build_batch([Req(PROMPT, [0, 1, 2], len(PROMPT))], PAGE)
        np.testing.assert_array_equal(replaced.forward(batch).logits, original.forward(batch).logits)


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


def test_a_row_that_cannot_be_sampled_fails_alone(tmp_path: Path) -> None:
    """NaN logits in one request (here from a NaN embedding) fail that row only: the call returns,
    the row's error names it, and the other rows get the tokens they get alone."""

    def poison(name: str, t: np.ndarray) -> np.ndarray:
        if name == "token_embd.weight":
            t = t.copy()
            t[NAN_TOKEN] = np.nan
        return t

    with Driver(write_tiny_gguf(tmp_path / "nan.gguf", "llama", tensor_hook=poison), PARAMS) as drv:
        batch = poisoned_batch()
        res = drv.forward(batch)
        assert res.tokens[0] == -1 and np.isnan(res.logits[0]).all()
        assert res.row_errors[0] is not None and res.row_errors[0].status == "invalid_argument"
        assert res.row_errors[0].message == POISONED_ROW_ERROR
        assert res.row_errors[1:] == [None, None]
        with pytest.raises(DriverError) as err:  # unless asked, such a row fails the call
            drv.forward(poisoned_batch(rows_fail_alone=False))
        assert err.value.status == "invalid_argument" and err.value.message == POISONED_ROW_ERROR
        for i in (1, 2):  # each healthy request alone: the same token
            alone = dataclasses.replace(batch, qo_indptr=np.array([0, 3]), tokens=batch.tokens[3 * i : 3 * i + 3],
                                        positions=batch.positions[3 * i : 3 * i + 3],
                                        kv_page_indices=batch.kv_page_indices[i : i + 1], kv_page_indptr=np.array([0, 1]),
                                        kv_last_page_len=batch.kv_last_page_len[i : i + 1], output_rows=np.array([2]),
                                        samplers=batch.samplers[i : i + 1])
            assert drv.forward(alone).tokens[0] == res.tokens[i] >= 0


def test_mask_hiding_everything_inside_the_sliding_window(tmp_path_factory) -> None:
    """gemma3's windowed layers (window 8 here): a token whose mask shows it only rows that fell
    out of the window would attend to nothing there."""
    with Driver(tiny_gguf(tmp_path_factory, "gemma3"), PARAMS) as drv:
        own = 12  # the token at KV index 12 sees only row 0: inside the causal range, out of the window
        req = Req(list(range(3, 3 + own + 1)), [0, 1, 2, 3], own + 1, masks=[None] * own + [[0, 1, own]])
        with pytest.raises(DriverError) as err:
            drv.forward(build_batch([req], PAGE))
        assert err.value.status == "invalid_argument"
        assert f"token {own}: its mask hides every KV row inside the sliding window of 8" in err.value.message


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
