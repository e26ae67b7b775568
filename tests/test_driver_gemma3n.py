"""Gemma 3n against llama.cpp on a tiny model (tiny_models.py): per-layer embeddings, AltUp over 4
streams, LAuReL, activation sparsity in the first 10 layers, V norm, final logit cap, sliding
window of 8 on 4 of every 5 layers, and KV sharing: layers 20-24 of 25 write no KV and attend
over layer 18's (sliding) or 19's (global), as llama.cpp's fixed rule says.

Tolerance 0, as for the other families (test_driver_logits.py): one request in one pass runs the
same ggml kernels on the same values as llama.cpp. Measured: max |diff| 0 on every comparison here
(logits of 2 and 34 tokens, every named activation, 16 greedy tokens), and in
test_driver_logits.py's chunked and batched passes (f32, f16, q8_0 weights; f16 and q8_0 KV).
Hostile files are refused at load with a status and a message naming the key or tensor, never a
ggml abort.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from driver_helpers import Req, SeqState, build_batch, tiny_gguf
from llama_ref import LlamaRef
from rpc_helpers import workers
from test_driver_activations import named
from test_driver_logits import EXACT, compare
from tiny_models import N_VOCAB, tiny_config, write_tiny_gguf

from pie_local.driver import Driver, DriverError, DriverParams

pytestmark = [pytest.mark.real_driver]

PAGE = 8
PARAMS = DriverParams(n_threads=2, page_size=PAGE, n_pages=16, device="cpu", own_kernels=False)  # ggml's, as llama.cpp
TOL = EXACT  # measured 0: see the module docstring


def prompt(n: int, seed: int = 5) -> list[int]:
    return [1] + np.random.default_rng(seed).integers(3, N_VOCAB, n - 1).tolist()


@pytest.fixture(scope="module")
def path(tmp_path_factory) -> Path:
    return tiny_gguf(tmp_path_factory, "gemma3n")


def one_request(drv: Driver, tokens: list[int], first_page: int = 0) -> np.ndarray:
    """Logits of every row of one request in one pass."""
    pages = list(range(first_page, first_page + -(-len(tokens) // PAGE)))
    return drv.forward(build_batch([Req(tokens, pages, len(tokens), outputs=list(range(len(tokens))))], PAGE)).logits


def driver_logits(path: Path, tokens: list[int]) -> np.ndarray:
    with Driver(path, PARAMS) as drv:
        return one_request(drv, tokens)


# ---------------------------------------------------------------------------------------------
# Against llama.cpp
# ---------------------------------------------------------------------------------------------


@pytest.mark.llama_cpp
@pytest.mark.parametrize("n", [2, 34], ids=["2_tokens", "34_tokens"])
def test_logits_match_llama_cpp(path: Path, record_property, n: int) -> None:
    """Every row of one request: 34 tokens run far past the window of 8."""
    tokens = prompt(n)
    with LlamaRef(path, n_ctx=128) as ref:
        want = ref.logits(tokens)
    compare(record_property, f"gemma3n.{n}", driver_logits(path, tokens), want, TOL)


@pytest.mark.llama_cpp
def test_greedy_tokens_equal_llama_cpp(path: Path) -> None:
    """16 greedy tokens after a 30-token prompt from the driver's sampler (prefill, then one
    decode per token over the paged KV) equal llama.cpp's, token for token and as text."""
    with LlamaRef(path, n_ctx=128) as ref, Driver(path, PARAMS) as drv:
        tokens = ref.tokenize("the world is good and the people of this state") + prompt(20, seed=7)[1:]
        want = ref.greedy(tokens, 16)
        assert drv.info.arch == "gemma3n" and drv.info.sliding_window == 8
        seq, feed, got = SeqState(range(16), PAGE), tokens, []
        for _ in range(16):
            got.append(int(drv.forward(build_batch([seq.req(feed)], PAGE)).tokens[0]))
            seq.advance(feed)
            feed = [got[-1]]
        assert got == want
        assert ref.detokenize(got) == ref.detokenize(want) and ref.detokenize(got).strip()


@pytest.mark.llama_cpp
def test_activations_equal_llama_cpp(path: Path) -> None:
    """Every tensor both engines name, layer by layer (AltUp's predictions and corrections, the
    per-layer inputs, LAuReL, Q/K/V after their norms and RoPE, the shared layers' attention),
    equals llama.cpp's; reading them changes no result."""
    tokens, rows = prompt(12, seed=11), [10, 11]  # two sampled rows: see test_driver_activations.py
    params = DriverParams(n_threads=2, page_size=PAGE, n_pages=16, device="cpu", repack=False, own_kernels=False)
    with Driver(path, params) as drv:
        plain = drv.forward(build_batch([Req(tokens, [0, 1], 12, outputs=rows)], PAGE)).logits
        with drv.activations() as ours:
            res = drv.forward(build_batch([Req(tokens, [2, 3], 12, outputs=rows)], PAGE)).logits
    assert np.array_equal(res, plain)
    assert np.array_equal(ours["result_output"], res)
    with LlamaRef(path, n_ctx=128, capture=named(ours)) as ref:
        ref.logits(tokens, rows=rows)
        theirs = ref.activations
    per_layer = {"predictions", "active_prediction", "attn_norm", "laurel_out", "Qcur_normed", "Qcur_pos", "kqv_out",
                 "attn_post_norm", "attn_laurel", "ffn_out", "corrected", "first_prediction_out", "l_out"}
    want = {f"{name}-{il}" for name in per_layer for il in range(25)}
    want |= {f"{name}-{il}" for name in ("Kcur_normed", "Vcur_normed", "Kcur_pos") for il in range(20)}
    want |= {"inp_scaled", "inp_per_layer", "inp_stacked", "altup_unembd", "result_norm", "result_output"}
    assert want <= set(theirs), sorted(want - set(theirs))
    assert not any(name.endswith(f"-{il}") for name in ours for il in range(20, 25)
                   if name.startswith(("Kcur", "Vcur"))), "a shared layer computed K or V"
    diffs = {}
    for name, theirs_t in theirs.items():
        assert ours[name].shape == theirs_t.shape, name
        diffs[name] = float(np.max(np.abs(ours[name].astype(np.float64) - theirs_t)))
    assert {name: d for name, d in diffs.items() if d > 0} == {}


# ---------------------------------------------------------------------------------------------
# Batches, window, KV sharing
# ---------------------------------------------------------------------------------------------


def test_a_batch_equals_each_request_alone(path: Path) -> None:
    """A wide prefill, a narrow one and a decode step after a 12-token prefix in one pass give
    each request exactly the logits it gets alone."""
    wide, narrow, prefix = prompt(20, seed=1), prompt(5, seed=2), prompt(12, seed=3)
    with Driver(path, PARAMS) as drv:
        alone_wide = one_request(drv, wide, first_page=0)
        alone_narrow = one_request(drv, narrow, first_page=3)
        one_request(drv, prefix, first_page=4)  # pages 4, 5
        step = Req([42], [4, 5], 13, outputs=[0])
        alone_step = drv.forward(build_batch([step], PAGE)).logits
        reqs = [Req(wide, [6, 7, 8], 20, outputs=list(range(20))), Req(narrow, [9], 5, outputs=list(range(5))), step]
        together = drv.forward(build_batch(reqs, PAGE)).logits
    assert np.array_equal(together[:20], alone_wide)
    assert np.array_equal(together[20:25], alone_narrow)
    assert np.array_equal(together[25:], alone_step)


def test_the_window_acts_past_its_length(tmp_path: Path, path: Path) -> None:
    """The same weights with a window of 64 instead of 8: the first 8 rows (inside either window)
    are the same, the later ones differ."""
    tokens = prompt(34, seed=4)
    windowed = driver_logits(path, tokens)
    wide = driver_logits(write_tiny_gguf(tmp_path / "w64.gguf", "gemma3n", sliding_window=64), tokens)
    assert np.array_equal(windowed[:8], wide[:8])
    assert np.abs(windowed[8:] - wide[8:]).max() > 0.1


def test_shared_layers_own_no_kv_and_read_an_earlier_layers(tmp_path: Path, path: Path) -> None:
    """The pool holds K and V of the 20 layers that own them; the same weights with every layer
    owning its KV (shared_kv_layers 0) need 25 layers' pages and compute other logits, so the
    shared layers really read layers 18 and 19's KV."""
    cfg = tiny_config("gemma3n")
    row = 2 * cfg.n_head_kv * cfg.head_dim * 2  # K and V, f16
    tokens = prompt(20, seed=6)
    with Driver(path, PARAMS) as drv:
        assert drv.info.n_layer == 25 and drv.info.page_bytes == PAGE * 20 * row
        shared = one_request(drv, tokens)
    own = write_tiny_gguf(tmp_path / "own.gguf", "gemma3n", metadata_hook=lambda w: w.add_shared_kv_layers(0))
    with Driver(own, PARAMS) as drv:
        assert drv.info.page_bytes == PAGE * 25 * row
        owned = one_request(drv, tokens)
    assert np.abs(shared - owned).max() > 0.1


def test_pages_copied_or_saved_keep_the_shared_kv(path: Path) -> None:
    """A prefix's pages copied elsewhere (a fork), or read out and written back into another
    driver (a snapshot), continue exactly as the original: the page operations cover every
    layer that owns KV."""
    prefix = prompt(16, seed=8)
    with Driver(path, PARAMS) as drv:
        one_request(drv, prefix, first_page=0)
        drv.copy_pages([0, 1], [4, 5])
        saved = drv.read_pages([0, 1])
        a = drv.forward(build_batch([Req([77], [0, 1, 2], 17, outputs=[0])], PAGE)).logits
        b = drv.forward(build_batch([Req([77], [4, 5, 6], 17, outputs=[0])], PAGE)).logits
    assert len(saved) == 2 * PAGE * 20 * 2 * 2 * 32 * 2  # pages x rows x 20 layers x (K, V) x 2 heads x 32 x f16
    with Driver(path, PARAMS) as other:
        other.write_pages([9, 10], saved)
        c = other.forward(build_batch([Req([77], [9, 10, 11], 17, outputs=[0])], PAGE)).logits
    assert np.array_equal(a, b) and np.array_equal(a, c)


@pytest.mark.timeout(240)
def test_shared_layers_on_a_worker_read_the_kv_here(path: Path) -> None:
    """Layers 19-24 on an RPC worker, 0-18 here: the worker holds layer 19's KV only, its sliding
    shared layers read layer 18's KV from this process, and the logits equal a local run's."""
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
    # ggml's kernels on both sides: the worker runs ggml's, so the local run must too
    params = {"n_threads": 1, "page_size": PAGE, "n_pages": 16, "repack": False, "own_kernels": False}

    def generate(drv: Driver) -> list[np.ndarray]:
        seq, feed, out = SeqState(range(16), PAGE), tokens, []
        for _ in range(4):
            res = drv.forward(build_batch([seq.req(feed)], PAGE))
            out.append(res.logits[0].copy())
            seq.advance(feed)
            feed = [int(res.tokens[0])]
        return out

    with Driver(path, DriverParams(n_gpu_layers=0, **params)) as local:
        want = generate(local)
        kv_layer = local.info.kv_bytes // 20
    with workers(1) as (worker,), Driver(path, DriverParams(rpc=(worker.endpoint,), n_gpu_layers=6, **params)) as split:
        remote, here = split.devices()
        got = generate(split)
    assert remote.layers == range(19, 25) and here.layers == range(19)
    assert (remote.kv_bytes, here.kv_bytes) == (kv_layer, 19 * kv_layer)
    for step, (g, w) in enumerate(zip(got, want)):
        assert np.array_equal(g, w), f"step {step}: max |diff| {np.abs(g - w).max()}"


# ---------------------------------------------------------------------------------------------
# Files that must not load
# ---------------------------------------------------------------------------------------------


def drop(name: str):
    return lambda tname, t: None if tname == name else t


def shorten(name: str):
    return lambda tname, t: t[..., :-1] if tname == name else t


@pytest.mark.parametrize(
    ("hook", "shown"),
    [
        (drop("blk.3.laurel_l.weight"), "'blk.3.laurel_l.weight' is missing"),
        (drop("blk.0.laurel_l.weight"), "'blk.0.laurel_l.weight' is missing"),
        (drop("per_layer_token_embd.weight"), "'per_layer_token_embd.weight' is missing"),
        (drop("blk.7.altup_router.weight"), "'blk.7.altup_router.weight' is missing"),
        (drop("blk.22.attn_k.weight"), "'blk.22.attn_k.weight' is missing"),  # shared, but llama.cpp needs it too
        (shorten("altup_proj.weight"), "'altup_proj.weight' has shape"),
        (shorten("blk.1.laurel_r.weight"), "'blk.1.laurel_r.weight' has shape"),
        (shorten("per_layer_model_proj.weight"), "'per_layer_model_proj.weight' has shape"),
        (shorten("blk.2.altup_predict_coef.weight"), "'blk.2.altup_predict_coef.weight' has shape"),
    ],
    ids=["laurel_missing", "laurel_rank_missing", "per_layer_embd_missing", "router_missing", "shared_k_missing",
         "altup_proj_shape", "laurel_r_shape", "per_layer_proj_shape", "predict_coef_shape"],
)
def test_missing_or_misshapen_tensors_are_format_errors(tmp_path: Path, hook, shown: str) -> None:
    path = write_tiny_gguf(tmp_path / "bad.gguf", "gemma3n", tensor_hook=hook)
    with pytest.raises(DriverError) as err:
        Driver(path, PARAMS)
    assert err.value.status == "format", err.value
    assert shown in err.value.message, err.value.message


def unset(key: str):
    return lambda w: w.kv_data[0].pop(key)


@pytest.mark.parametrize(
    ("hook", "shown"),
    [
        (lambda w: w.add_shared_kv_layers(24), "at least 2 must own"),
        (lambda w: w.add_shared_kv_layers(26), "0 .. 25"),
        (lambda w: w.add_altup_num_inputs(1), "altup.num_inputs' is 1"),
        (lambda w: w.add_altup_active_idx(4), "altup.active_idx' is 4"),
        (lambda w: w.add_embedding_length_per_layer_input(0), "embedding_length_per_layer_input' is 0"),
        (lambda w: w.add_activation_sparsity_scale([1.0] * 3), "25 float32 values"),
        (lambda w: w.add_activation_sparsity_scale([float("nan")] * 25), "nan"),
        (lambda w: w.add_sliding_window_pattern([il != 24 for il in range(25)]), "does not fit"),  # 24 global, 19 not
        (lambda w: w.add_sliding_window_pattern([True, False]), "25 booleans"),
        (unset("gemma3n.attention.sliding_window"), "sliding_window' is missing"),
        (lambda w: w.add_sliding_window(0), "sliding_window is 0"),
        (lambda w: w.add_final_logit_softcapping(0.0), "final_logit_softcapping' is 0"),
        (lambda w: w.add_string("gemma3n.attention.shared_kv_layers", "ten"), "must be one integer"),
    ],
    ids=["shared_all_but_one", "shared_too_many", "altup_one", "active_idx_out", "per_layer_zero",
         "sparsity_short", "sparsity_nan", "pattern_breaks_sharing", "pattern_short", "window_missing",
         "window_zero", "final_cap_zero", "shared_string"],
)
def test_hostile_hyper_parameters_are_format_errors(tmp_path: Path, hook, shown: str) -> None:
    path = write_tiny_gguf(tmp_path / "bad.gguf", "gemma3n", metadata_hook=hook)
    with pytest.raises(DriverError) as err:
        Driver(path, PARAMS)
    # a string where a count belongs is "unsupported" (as for every family: pie_gguf_int_opt)
    assert err.value.status == ("unsupported" if "one integer" in shown else "format"), err.value
    assert shown in err.value.message, err.value.message


def test_feed_forward_length_per_layer(tmp_path: Path, path: Path) -> None:
    """Gemma 3n's converter writes feed_forward_length as one value per layer: equal values load as
    one width (the same logits), different ones are refused."""
    tokens = prompt(10, seed=12)
    listed = write_tiny_gguf(tmp_path / "ff.gguf", "gemma3n", metadata_hook=lambda w: w.add_feed_forward_length([128] * 25))
    assert np.array_equal(driver_logits(listed, tokens), driver_logits(path, tokens))
    mixed = write_tiny_gguf(tmp_path / "mixed.gguf", "gemma3n",
                            metadata_hook=lambda w: w.add_feed_forward_length([128] * 24 + [64]))
    with pytest.raises(DriverError) as err:
        Driver(mixed, PARAMS)
    assert err.value.status == "unsupported" and "different widths (128, 64)" in err.value.message, err.value


def test_defaults_when_the_file_has_only_llama_cpps_keys(tmp_path: Path, path: Path) -> None:
    """Without the converter's extra keys (AltUp counts, per-layer width, shared layers, sparsity,
    pattern) the driver takes llama.cpp's fixed values, which the tiny model's keys agree with."""
    keys = ["altup.active_idx", "altup.num_inputs", "embedding_length_per_layer_input", "attention.shared_kv_layers",
            "activation_sparsity_scale", "attention.sliding_window_pattern", "final_logit_softcapping"]

    def bare(w: gguf.GGUFWriter) -> None:
        for key in keys:
            w.kv_data[0].pop(f"gemma3n.{key}")

    tokens = prompt(24, seed=9)
    assert np.array_equal(driver_logits(write_tiny_gguf(tmp_path / "bare.gguf", "gemma3n", metadata_hook=bare), tokens),
                          driver_logits(path, tokens))
