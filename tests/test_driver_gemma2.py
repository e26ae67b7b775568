"""Gemma 2 against llama.cpp: attention and final logit softcaps, sliding-window layers that
alternate with global ones (llama.cpp's pattern, or one flag per layer), Q scaled before
attention, post-norms. The tiny model's caps (1.5 on attention, 4 on the logits) and window (8)
are small enough that leaving any of them out changes the logits far beyond the tolerance.

Tolerance 0, as for the other families (test_driver_logits.py): one request in one pass runs the
same kernels as llama.cpp, and the attention softcap is applied inside ggml's fused attention on
both sides. Hostile hyper-parameters are refused at load with PIE_ERR_FORMAT naming the key.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from driver_helpers import SeqState, build_batch, tiny_gguf
from llama_ref import LlamaRef
from tiny_models import N_VOCAB, write_tiny_gguf

from pie_local.driver import Driver, DriverError, DriverParams

pytestmark = [pytest.mark.real_driver]

PAGE = 8
PARAMS = DriverParams(n_threads=2, page_size=PAGE, n_pages=16, device="cpu")


def prompt(n: int, seed: int = 5) -> list[int]:
    return [1] + np.random.default_rng(seed).integers(3, N_VOCAB, n - 1).tolist()


def driver_logits(path: Path, tokens: list[int]) -> np.ndarray:
    with Driver(path, PARAMS) as drv:
        return drv.forward(build_batch([SeqState(range(16), PAGE).req(tokens, outputs="all")], PAGE)).logits


def driver_greedy(drv: Driver, tokens: list[int], n_new: int) -> list[int]:
    seq, feed, out = SeqState(range(16), PAGE), tokens, []
    for _ in range(n_new):
        out.append(int(drv.forward(build_batch([seq.req(feed)], PAGE)).tokens[0]))
        seq.advance(feed)
        feed = [out[-1]]
    return out


@pytest.mark.llama_cpp
def test_greedy_tokens_equal_llama_cpp(tmp_path_factory) -> None:
    """20 greedy tokens after a 30-token prompt: the sequence runs far past the window of 8."""
    path = tiny_gguf(tmp_path_factory, "gemma2")
    tokens = prompt(30)
    with LlamaRef(path, n_ctx=128) as ref:
        want = ref.greedy(tokens, 20)
    with Driver(path, PARAMS) as drv:
        assert drv.info.arch == "gemma2" and drv.info.sliding_window == 8
        assert driver_greedy(drv, tokens, 20) == want


@pytest.mark.llama_cpp
@pytest.mark.parametrize("flags", [[True, False, False, True], [False, True, True, True]], ids=["tffT", "fttt"])
def test_layer_pattern_as_flags_matches_llama_cpp(tmp_path: Path, flags: list[bool]) -> None:
    """attention.sliding_window_pattern as one flag per layer, as llama.cpp reads it; the logits
    differ from the default pattern's, so the flags are really read."""
    def hook(w: gguf.GGUFWriter) -> None:
        w.add_array("gemma2.attention.sliding_window_pattern", flags)

    path = write_tiny_gguf(tmp_path / "flags.gguf", "gemma2", metadata_hook=hook)
    tokens = prompt(30, seed=9)
    with LlamaRef(path, n_ctx=128) as ref:
        want = ref.logits(tokens)
    got = driver_logits(path, tokens)
    assert np.array_equal(got, want)
    default = driver_logits(write_tiny_gguf(tmp_path / "default.gguf", "gemma2"), tokens)
    assert np.abs(default - got).max() > 0.1


@pytest.mark.llama_cpp
def test_every_layer_sliding_runs_and_matches(tmp_path: Path) -> None:
    """Pattern 0 (every layer slides): the graph then reads only the windowed mask."""
    path = write_tiny_gguf(tmp_path / "all.gguf", "gemma2",
                           metadata_hook=lambda w: w.add_uint32("gemma2.attention.sliding_window_pattern", 0))
    tokens = prompt(20, seed=2)
    with LlamaRef(path, n_ctx=128) as ref:
        want = ref.logits(tokens)
    assert np.array_equal(driver_logits(path, tokens), want)


@pytest.mark.llama_cpp
def test_the_caps_change_the_logits(tmp_path: Path) -> None:
    """The same weights with caps too large to bite give other logits (and match llama.cpp too):
    the tiny model's caps are exercised, not decoration."""
    tokens = prompt(24, seed=4)
    capped = driver_logits(write_tiny_gguf(tmp_path / "capped.gguf", "gemma2"), tokens)
    path = write_tiny_gguf(tmp_path / "loose.gguf", "gemma2", attn_softcap=1e6, final_softcap=1e6)
    loose = driver_logits(path, tokens)
    with LlamaRef(path, n_ctx=128) as ref:
        assert np.array_equal(loose, ref.logits(tokens))
    assert np.abs(capped).max() <= 4.0  # the final cap bounds every logit
    assert np.abs(loose - capped).max() > 0.5


@pytest.mark.parametrize(
    ("key", "write", "shown"),
    [
        ("gemma2.attn_logit_softcapping", lambda w, k: w.add_float32(k, 0.0), "is 0;"),
        ("gemma2.attn_logit_softcapping", lambda w, k: w.add_float32(k, -50.0), "-50"),
        ("gemma2.attn_logit_softcapping", lambda w, k: w.add_float32(k, float("nan")), "nan"),
        ("gemma2.final_logit_softcapping", lambda w, k: w.add_float32(k, 0.0), "is 0;"),
        ("gemma2.final_logit_softcapping", lambda w, k: w.add_float32(k, float("inf")), "inf"),
        ("gemma2.attention.sliding_window", lambda w, k: w.add_uint64(k, 1 << 40), "1099511627776"),
        ("gemma2.attention.sliding_window", lambda w, k: w.add_int32(k, 0), "is 0;"),
        ("gemma2.attention.sliding_window", lambda w, k: w.add_int32(k, -8), "is -8;"),
        ("gemma2.attention.sliding_window", lambda w, k: w.add_float32(k, 8.0), "must be an integer"),
        ("gemma2.attention.sliding_window_pattern", lambda w, k: w.add_int32(k, -2), "negative"),
        ("gemma2.attention.sliding_window_pattern", lambda w, k: w.add_array(k, [True, False]), "4 booleans"),
        ("gemma2.rope.freq_base_swa", lambda w, k: w.add_float32(k, float("nan")), "nan"),
    ],
    ids=["attn_cap_zero", "attn_cap_negative", "attn_cap_nan", "final_cap_zero", "final_cap_inf",
         "window_too_large", "window_zero", "window_negative", "window_float", "pattern_negative",
         "pattern_short", "swa_base_nan"],
)
def test_hostile_hyper_parameters_are_format_errors(tmp_path: Path, key: str, write, shown: str) -> None:
    # the tiny model writes none of these keys itself: each file has exactly the bad one
    path = write_tiny_gguf(tmp_path / "bad.gguf", "gemma2", sliding_window=0, attn_softcap=0.0, final_softcap=0.0,
                           metadata_hook=lambda w: write(w, key))
    with pytest.raises(DriverError) as err:
        Driver(path, PARAMS)
    assert err.value.status == "format", err.value
    assert key in err.value.message and shown in err.value.message, err.value.message


def test_defaults_when_the_file_has_no_caps_or_window(tmp_path: Path) -> None:
    """Gemma 2's own defaults (llama.cpp's): caps 50 and 30, a window of 4096 on every other layer."""
    path = write_tiny_gguf(tmp_path / "bare.gguf", "gemma2", sliding_window=0, attn_softcap=0.0, final_softcap=0.0)
    with Driver(path, PARAMS) as drv:
        assert drv.info.sliding_window == 4096
        logits = drv.forward(build_batch([SeqState(range(16), PAGE).req(prompt(12), outputs="all")], PAGE)).logits
    assert np.all(np.isfinite(logits)) and np.abs(logits).max() < 30.0
