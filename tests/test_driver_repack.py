"""Repacked weights (DriverParams.repack): ggml's CPU_REPACK buffer type for the matrices its kernels take.

The driver probes each matrix it multiplies at load (as llama.cpp's loader does) and stores the
supported ones interleaved for ggml-cpu/repack.cpp's gemv/gemm kernels. Its logits then match
llama.cpp loaded with its extra buffer types (use_extra_bufts, llama.cpp's default) bit for bit
wherever both run the same kernels: a sequence computed alone in passes of fewer than 4 or at
least 16 rows. In between, the driver multiplies a narrow request's rows one by one (gemv) where
llama.cpp takes gemm for whole groups of 4, which sums q4_K and q2_K products in another order
(q4_0 and iq4_nl give the same values either way on x86); those comparisons, and repack on
against off (other kernels altogether), keep measured tolerances with their reasons. The driver's
own kernels (own_kernels, tests/test_matmul_q8.py, tests/test_attention_cpu.py) stay off here:
these tests are about ggml's repack kernels.
Batch invariance with repacked weights: tests/test_driver_invariance.py.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import gguf
import numpy as np
import pytest
from driver_helpers import SeqState, build_batch, log_softmax, repacked_types, tiny_gguf
from llama_ref import LlamaRef

from pie_local.bench.machine import extra_bufts_safe
from pie_local.driver import Driver, DriverParams

pytestmark = [pytest.mark.real_driver, pytest.mark.llama_cpp]

PAGE = 8
WIDE = {"n_embd": 256, "n_ff": 512, "head_dim": 64}  # k-quant rows hold whole 256-blocks
SAFE, WHY = extra_bufts_safe()
needs_extra_bufts = pytest.mark.skipif(not SAFE, reason=f"llama.cpp's extra buffer types are unsafe here: {WHY}")

MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def expected_repacked(path: Path) -> int | None:
    """The matrices of `path` the driver should repack: the multiplied ones (each layer's
    projections, an untied head) of a type the kernels take, with rows in whole groups of 8."""
    types = repacked_types()
    if types is None:
        return None
    n = 0
    for t in gguf.GGUFReader(path).tensors:
        parts = t.name.split(".")
        multiplied = t.name == "output.weight" or (len(parts) == 4 and parts[0] == "blk" and parts[2] in MATRICES)
        if multiplied and t.tensor_type.name in types and int(t.shape[1]) % 8 == 0:
            n += 1
    return n


def measure(label: str, got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    diff = np.abs(got.astype(np.float64) - want)
    lp_w, lp_g = log_softmax(want), log_softmax(got)
    m = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
         "max_kl": float(np.max(np.sum(np.exp(lp_w) * (lp_w - lp_g), axis=-1)))}  # fmt: skip
    print(f"{label}: " + " ".join(f"{k}={v:.3g}" for k, v in m.items()))
    return m


def driver_logits(path: Path, prompts: list[list[int]], repack: bool, follow: list[np.ndarray] | None = None,
                  n_decode: int = 3, own_kernels: bool = False) -> list[np.ndarray]:
    """Each prompt alone in one pass, then n_decode steps: every row's logits. The steps feed the
    greedy tokens of `follow` (another run's logits) when given, else their own."""
    out = []
    with Driver(path, DriverParams(n_threads=2, page_size=PAGE, n_pages=64, repack=repack, own_kernels=own_kernels)) as drv:
        for i, prompt in enumerate(prompts):
            seq, feed, rows = SeqState(range(64), PAGE), prompt, []
            for step in range(n_decode + 1):
                rows.append(drv.forward(build_batch([seq.req(feed, outputs="all")], PAGE)).logits)
                seq.advance(feed)
                lead = rows[-1][-1] if follow is None else follow[i][len(prompt) - 1 + step]
                feed = [int(np.argmax(lead))]
            out.append(np.concatenate(rows))
    return out


def ref_logits(path: Path, prompts: list[list[int]], got: list[np.ndarray], n_decode: int = 3) -> list[np.ndarray]:
    """llama.cpp with its extra buffer types: each prompt in one pass, then the driver's greedy
    tokens one step at a time (the same passes as driver_logits)."""
    out = []
    with LlamaRef(path, n_ctx=256, extra_bufts=True) as ref:
        for prompt, rows in zip(prompts, got, strict=True):
            ref.reset()
            tokens = [int(np.argmax(r)) for r in rows[len(prompt) - 1 : -1]]
            want = [ref.logits(prompt, seq_id=0, rows="all")]
            for i, tok in enumerate(tokens):
                want.append(ref.logits([tok], seq_id=0, start_pos=len(prompt) + i, rows="all"))
            out.append(np.concatenate(want))
    return out


# ---------------------------------------------------------------------------------------------
# The load-time probe and the option
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["q4_0", "q4_k", "iq4_nl", "q2_k", "q6_k", "q8_0"])
def test_probe_repacks_the_supported_matrices(tmp_path_factory, caplog, quant: str) -> None:
    path = tiny_gguf(tmp_path_factory, "llama", quant, **WIDE)
    caplog.set_level(logging.INFO, logger="pie_local.driver")
    # ggml's kernels: the driver's own ones take q4_K and q6_K instead (test_own_kernels_keep_their_types)
    with Driver(path, DriverParams(n_threads=2, page_size=PAGE, n_pages=8, own_kernels=False)) as on:
        n_on = on.info.n_repacked
    with Driver(path, DriverParams(n_threads=2, page_size=PAGE, n_pages=8, repack=False)) as off:
        assert off.info.n_repacked == 0
    log = caplog.text
    assert "repack off: the repack option is off" in log
    want = expected_repacked(path)
    if want is not None:
        assert n_on == want
    if n_on:
        assert f"repack on: {n_on} of " in log
    else:
        assert "CPU_REPACK kernels take none of this model's matrices" in log


def test_embedding_and_tied_head_stay_in_place(tmp_path_factory) -> None:
    """gemma3 ties its head to the embedding, which get_rows reads: only the layers' matrices
    move. The file mapped or read into memory, the other weights land where they did."""
    path = tiny_gguf(tmp_path_factory, "gemma3", "q4_0", **WIDE)
    got = []
    for use_mmap in (True, False):
        params = DriverParams(n_threads=2, page_size=PAGE, n_pages=8, use_mmap=use_mmap)
        with Driver(path, params) as drv:
            if repacked_types() is not None:
                assert drv.info.n_repacked == 7 * drv.info.n_layer == expected_repacked(path)
            seq = SeqState(range(4), PAGE)
            got.append(drv.forward(build_batch([seq.req([1, 5, 9, 300], outputs="all")], PAGE)).logits)
    assert np.all(np.isfinite(got[0])) and np.ptp(got[0][-1]) > 1.0
    assert np.array_equal(got[0], got[1])


# ---------------------------------------------------------------------------------------------
# Against llama.cpp with its extra buffer types, and against the plain weights
# ---------------------------------------------------------------------------------------------

# Tiny models (logits within about +-7): passes of 4..15 rows, where the driver's gemv and
# llama.cpp's gemm sum q4_K / q2_K products in another order. Measured: max 0.105, mean 0.0124,
# KL 0.0003 (llama q2_k); a missing or misread weight moves logits by O(1).
NARROW_MAX, NARROW_MEAN, NARROW_KL = 0.3, 0.05, 0.01
# Repack on against off: other kernels (gemv/gemm against vec_dot/tiled) for every repacked
# product, the decode steps fed the same tokens. Measured on the tiny models: max 0.107, mean
# 0.0181, KL 0.0005.
ONOFF_MAX, ONOFF_MEAN, ONOFF_KL = 0.3, 0.05, 0.01


@needs_extra_bufts
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("quant", ["q4_0", "q4_k", "iq4_nl", "q2_k"])
def test_tiny_repacked_logits_match_llama_cpp(tmp_path_factory, arch: str, quant: str) -> None:
    path = tiny_gguf(tmp_path_factory, arch, quant, **WIDE)
    rng = np.random.default_rng(zlib.crc32(f"{arch}-{quant}".encode()))
    exact = [[1] + rng.integers(3, 500, n - 1).tolist() for n in (2, 20, 37)]  # < 4 or >= 16 rows
    narrow = [[1] + rng.integers(3, 500, n - 1).tolist() for n in (6, 13)]
    on = driver_logits(path, exact + narrow, repack=True)
    want = ref_logits(path, exact + narrow, on)
    off = driver_logits(path, exact + narrow, repack=False, follow=on)
    for i, (prompt, got, ref) in enumerate(zip(exact, on, want, strict=False)):
        # iq4_nl: the head (561 rows, not whole groups of 8) stays plain, where a lone decode
        # row pairs with a zero column (sgemm) and llama.cpp's takes vec_dot: measured 4.8e-7
        rows = len(prompt) if quant == "iq4_nl" else len(got)
        assert np.array_equal(got[:rows], ref[:rows]), f"{arch} {quant} prompt {i}: {measure('exact', got, ref)}"
        assert np.abs(got - ref).max() < 1e-5
    for got, ref in zip(on[len(exact) :], want[len(exact) :], strict=True):
        m = measure(f"{arch}.{quant}.narrow", got, ref)
        assert m["max_abs"] <= NARROW_MAX and m["mean_abs"] <= NARROW_MEAN and m["max_kl"] <= NARROW_KL, m
    for got, plain in zip(on, off, strict=True):
        m = measure(f"{arch}.{quant}.on_vs_off", got, plain)
        assert m["max_abs"] <= ONOFF_MAX and m["mean_abs"] <= ONOFF_MEAN and m["max_kl"] <= ONOFF_KL, m


# Starter model (Gemma 3 270M Q4_K_M: 27 q4_K matrices repacked on x86; logits within about
# +-30 on text): a narrow prompt (6 rows: the driver's gemv against llama.cpp's gemm for 4 of
# them) and repack on against off. Gemma 3 amplifies rounding (see CHUNKED_TOL in
# test_driver_logits.py: llama.cpp's own flash-attention switch moves prompts by max 2.08,
# mean 0.29). Measured: on against off max 1.30, mean 0.161, KL 0.019 (the 27-token prompt);
# the narrow prompt against llama.cpp: equal.
STARTER_MAX, STARTER_MEAN, STARTER_KL = 3.0, 0.4, 0.25
WIDE_TEXT = ("In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole, filled with the "
             "ends of worms and an oozy smell")  # fmt: skip
NARROW_TEXT = "The capital of France is"


@needs_extra_bufts
def test_starter_repacked_logits_match_llama_cpp(starter_gguf) -> None:
    with LlamaRef(starter_gguf, n_ctx=64, extra_bufts=True) as ref:
        wide, narrow = ref.tokenize(WIDE_TEXT), ref.tokenize(NARROW_TEXT)
    assert len(wide) >= 16 and 4 <= len(narrow) < 16
    on = driver_logits(starter_gguf, [wide, narrow], repack=True)
    want = ref_logits(starter_gguf, [wide, narrow], on)
    off = driver_logits(starter_gguf, [wide, narrow], repack=False, follow=on)
    with Driver(starter_gguf, DriverParams(n_threads=2, page_size=PAGE, n_pages=8, own_kernels=False)) as drv:
        if repacked_types() is not None:
            assert drv.info.n_repacked == expected_repacked(starter_gguf) == 27
    # the wide prompt alone in one pass and every decode step: the same kernels on both sides
    assert np.array_equal(on[0], want[0]), measure("starter.wide", on[0], want[0])
    # the driver's defaults: its own kernels too (q8_0/q5_0 products summed in another float
    # order, attention summed in float32 where ggml sums V in fp16), whose rounding the 18 layers
    # amplify like the narrow prompt's gemv-for-gemm (measured against llama.cpp: wide prompt max
    # 1.66, mean 0.20, KL 0.012; narrow max 1.32, mean 0.21, KL 0.010)
    own = driver_logits(starter_gguf, [wide, narrow], repack=True, follow=on, own_kernels=True)
    checks = [("starter.narrow", on[1], want[1])] + [("starter.on_vs_off", a, b) for a, b in zip(on, off, strict=True)]
    checks += [("starter.own_kernels", a, b) for a, b in zip(own, want, strict=True)]
    for label, got, ref_rows in checks:
        m = measure(label, got, ref_rows)
        assert m["max_abs"] <= STARTER_MAX and m["mean_abs"] <= STARTER_MEAN and m["max_kl"] <= STARTER_KL, m
    assert not np.array_equal(on[0], off[0])  # the option changes the kernels of 27 products
