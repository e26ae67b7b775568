"""Named activations: the driver names its intermediate tensors as llama.cpp does ("attn_norm-0",
"Qcur-3", "l_out-17", "result_norm", ...) and ``Driver.activations()`` hands them out, so a graph
that goes wrong shows up at the layer and tensor where it starts, not only in the logits.

Tolerance against llama.cpp: zero. Measured on the CPU (1 and 2 threads, tiny f32 models of every
architecture and the starter model, one request): every tensor both engines name, in every layer,
equals llama.cpp's bit for bit — both run the same ggml kernels in this process and, for a single
request, sum in the same order. A difference therefore means a graph that differs from
llama.cpp's. (Batches of several requests and chunked prefill reorder sums; test_driver_logits.py
covers those with measured tolerances.)
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from driver_helpers import Req, build_batch, tiny_gguf
from llama_ref import LlamaRef
from tiny_models import ARCHES, tiny_config

from pie_local.driver import Driver, DriverParams

pytestmark = pytest.mark.real_driver

PAGE = 16
# device "cpu": the comparison with llama.cpp (weights on the CPU) assumes the same kernels
PARAMS = DriverParams(n_threads=2, page_size=PAGE, n_pages=8, device="cpu", repack=False, own_kernels=False)
TOKENS = [1, 300, 301, 302, 303, 304, 305]
OUTPUTS = [2, 6]

# What each family names per layer, besides the tensors all of them name.
# Routed experts (llama.cpp's build_moe_ffn names; ffn_moe_topk is I32, not collected):
MOE = {"ffn_inp", "ffn_moe_logits", "ffn_moe_probs", "ffn_moe_weights", "ffn_moe_up", "ffn_moe_gate", "ffn_moe_swiglu",
       "ffn_moe_down", "ffn_moe_weighted", "ffn_moe_out"}  # fmt: skip
EVERY_LAYER = {"attn_norm", "Qcur", "Kcur", "Vcur", "kqv_out", "attn_out", "ffn_norm", "ffn_out", "l_out"}
FAMILY_LAYER = {
    "llama": {"ffn_inp"},
    "qwen2": {"ffn_inp"},
    "qwen3": {"Qcur_normed", "Kcur_normed", "ffn_inp"},
    "gemma2": {"attn_post_norm", "sa_out", "ffn_geglu", "ffn_post_norm"},
    "gemma3": {"Qcur_normed", "Kcur_normed", "attn_post_norm", "sa_out", "ffn_geglu", "ffn_post_norm"},
    "phi3": set(),
    "granite": {"ffn_inp"},
    "smollm3": {"ffn_inp"},
    "olmo2": {"Qcur_normed", "Kcur_normed", "attn_post_norm", "ffn_inp"},
    "mistral3": {"Qcur_attn_temp_scaled", "ffn_inp"},
    "qwen2moe": MOE | {"ffn_shexp_gate_inp", "ffn_shexp_gate", "ffn_shexp"},
    "qwen3moe": MOE | {"Qcur_normed", "Kcur_normed", "ffn_moe_weights_norm"},
    "olmoe": MOE | {"Qcur_normed", "Kcur_normed"},
    "gpt-oss": (MOE - {"ffn_moe_swiglu"}) | {"attn_post_norm", "ffn_moe_weights_softmax", "ffn_moe_up_biased",
                                            "ffn_moe_gate_biased", "ffn_moe_swiglu_oai", "ffn_moe_down_biased"},
}
NO_PRE_NORMS = {"olmo2"}
# Routed experts end in ffn_moe_out (qwen2moe adds its shared expert into ffn_out); gpt-oss
# normalises the FFN input with its post-attention norm.
NOT_NAMED = {"qwen3moe": {"ffn_out"}, "olmoe": {"ffn_out"}, "gpt-oss": {"ffn_out", "ffn_norm"}}
# gpt-oss's last layer runs over every row (the sampled ones are kept after it), as in llama.cpp
LAST_LAYER_ALL_ROWS = {"gpt-oss"}
# gemma3n's layers carry 4 AltUp streams ([n_altup, n, n_embd] per layer) and its shared-KV layers
# have no K or V of their own: test_driver_gemma3n.py compares its activations with llama.cpp's
LAYERED = tuple(arch for arch in ARCHES if arch != "gemma3n")
# Named once for the whole graph besides embd, result_norm and result_output (llama.cpp names
# OLMo 2's FFN post-norm without its layer).
FAMILY_GLOBAL = {"gemma2": {"inp_scaled"}, "gemma3": {"inp_scaled"}, "olmo2": {"ffn_post_norm"}}
# llama.cpp names the attention output after its projection for these only
NAMES_ATTN_OUT = {"llama", "granite", "smollm3", "mistral3", "gpt-oss"}


def expected_names(arch: str, n_layer: int) -> set[str]:
    per_layer = EVERY_LAYER - ({"attn_norm", "ffn_norm"} if arch in NO_PRE_NORMS else set()) - NOT_NAMED.get(arch, set())
    per_layer |= FAMILY_LAYER[arch]
    names = {f"{name}-{il}" for name in per_layer for il in range(n_layer)}
    return names | {"embd", "result_norm", "result_output"} | FAMILY_GLOBAL.get(arch, set())


def named(acts: dict[str, np.ndarray]) -> set[str]:
    """The names the builders gave (ggml's own are "node_12", "Vcur-0 (reshaped)", ...)."""
    return {name for name in acts if re.fullmatch(r"[A-Za-z_]+(-\d+)?", name)}


def one_pass(driver: Driver, first_page: int, tokens: list[int] = TOKENS, outputs: list[int] = OUTPUTS):
    pages = list(range(first_page, first_page + -(-len(tokens) // PAGE)))
    batch = build_batch([Req(tokens, pages, len(tokens), outputs=outputs)], PAGE, return_hidden=True)
    return driver.forward(batch)


@pytest.mark.parametrize("arch", LAYERED)
def test_every_layer_is_named_and_the_last_one_gives_the_logits(tmp_path_factory, arch: str) -> None:
    cfg = tiny_config(arch)
    with Driver(tiny_gguf(tmp_path_factory, arch), PARAMS) as driver:
        plain = one_pass(driver, 0)
        with driver.activations() as acts:
            res = one_pass(driver, 1)
        assert named(acts) == expected_names(arch, cfg.n_layer)

        n, last = len(TOKENS), cfg.n_layer - 1
        if arch not in NO_PRE_NORMS:
            assert acts["attn_norm-0"].shape == (n, cfg.n_embd)
        assert acts["Qcur-0"].shape == (n, cfg.n_head, cfg.head_dim)
        assert acts["Kcur-0"].shape == acts["Vcur-0"].shape == (n, cfg.n_head_kv, cfg.head_dim)
        assert acts["kqv_out-0"].shape == (n, cfg.n_head * cfg.head_dim)
        assert acts["l_out-0"].shape == (n, cfg.n_embd)
        last_rows = n if arch in LAST_LAYER_ALL_ROWS else len(OUTPUTS)  # else only the sampled rows
        assert acts[f"l_out-{last}"].shape == (last_rows, cfg.n_embd)
        # the final layer's output, normed and through the head, is what forward returned
        assert np.array_equal(acts["result_norm"], res.hidden)
        assert np.array_equal(acts["result_output"], res.logits)
        # reading activations changes no result
        assert np.array_equal(res.logits, plain.logits) and np.array_equal(res.hidden, plain.hidden)

        # a name list takes just those; after the block nothing is collected
        with driver.activations(["l_out-0", "result_norm"]) as some:
            one_pass(driver, 2)
        assert set(some) == {"l_out-0", "result_norm"}
        kept = some["l_out-0"].copy()
        one_pass(driver, 3, tokens=TOKENS[::-1])
        assert set(some) == {"l_out-0", "result_norm"} and np.array_equal(some["l_out-0"], kept)


def compare_with_llama_cpp(path, arch: str, tokens: list[int], fused_qkv: bool = False) -> dict[str, float]:
    """Every activation both engines name for one prompt (last two rows sampled): name -> max |diff|.

    Two sampled rows, not one: ggml picks a product's kernel by its column count, and the driver
    multiplies a lone column of f32/f16 weights as two (so that a row's values never depend on
    its batch, see pie_matmul), which llama.cpp does from two rows on as well."""
    rows = [len(tokens) - 2, len(tokens) - 1]
    with Driver(path, PARAMS) as driver:
        with driver.activations() as ours:
            one_pass(driver, 0, tokens=tokens, outputs=rows)
        n_layer = driver.info.n_layer
    names = named(ours)
    with LlamaRef(path, n_ctx=256, n_threads=2, capture=names) as ref:
        ref.logits(tokens, rows=rows)
        theirs = ref.activations
    unnamed = set() if arch in NAMES_ATTN_OUT else {f"attn_out-{il}" for il in range(n_layer)}
    if fused_qkv:  # llama.cpp's V is then a strided view of the projection, which it does not hand out
        unnamed |= {f"Vcur-{il}" for il in range(n_layer)}
    if arch == "gemma2":  # llama.cpp names gemma2's FFN post-norm without its layer (we name each)
        unnamed |= {f"ffn_post_norm-{il}" for il in range(n_layer)}
    assert set(theirs) == expected_names(arch, n_layer) - unnamed
    diffs = {}
    for name, want in theirs.items():
        assert ours[name].shape == want.shape, name
        diffs[name] = float(np.max(np.abs(ours[name].astype(np.float64) - want)))
    return diffs


@pytest.mark.llama_cpp
@pytest.mark.parametrize("arch", LAYERED)
def test_tiny_activations_equal_llama_cpp(tmp_path_factory, arch: str) -> None:
    diffs = compare_with_llama_cpp(tiny_gguf(tmp_path_factory, arch), arch, TOKENS, tiny_config(arch).fused_qkv)
    assert {name: d for name, d in diffs.items() if d > 0} == {}


@pytest.mark.llama_cpp
def test_starter_activations_equal_llama_cpp(starter_gguf) -> None:
    with LlamaRef(starter_gguf, n_ctx=256) as ref:
        tokens = ref.tokenize("def fibonacci(n):\n    if n < 2:\n        return n\n    return")
    diffs = compare_with_llama_cpp(starter_gguf, "gemma3", tokens)
    assert diffs["l_out-0"] == 0.0  # the first layer's output
    assert {name: d for name, d in diffs.items() if d > 0} == {}
