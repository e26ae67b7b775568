"""The families beyond Llama, Qwen and Gemma (Phi-3, Granite, SmolLM3, OLMo 2, Mistral 3) against
llama.cpp on tiny models: the variants test_driver_logits.py does not cover (LongRoPE's factors
chosen by context, OLMo 3's sliding window, FFN biases, a fused Q|K|V in a Llama file, Granite
without RoPE), greedy text, and files with bad hyper-parameters, each refused with a message
that names the key or tensor. (Mixture-of-experts files, a Mixtral-style Llama among them:
test_driver_moe.py.)

Tolerance against llama.cpp: zero, as in test_driver_logits.py's tiny models (one request per
pass and passes of fewer than 8 rows or at least 16, so both engines pick the same kernels on the
same values). Measured: every comparison here differs by exactly 0. The driver runs with repack
off: with it on, q8_0, q5_0, q4_K and q6_K products take the driver's own kernels (test_matmul_q8.py), not ggml's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import pytest
from driver_helpers import Req, SeqState, build_batch, tiny_gguf
from llama_ref import LlamaRef
from test_driver_logits import EXACT, compare
from tiny_models import tiny_config, write_tiny_gguf

from pie_local.driver import Driver, DriverError, DriverParams

pytestmark = [pytest.mark.real_driver, pytest.mark.llama_cpp]

PAGE = 8
NEW_ARCHES = ("phi3", "granite", "smollm3", "olmo2", "mistral3")
TOKENS = [1] + np.random.default_rng(5).integers(3, 500, 33).tolist()  # 34: past every window


def one_request(path: Path, tokens: list[int], n_pages: int = 32, start: int = 0) -> np.ndarray:
    """Logits of every row of one request in one pass through the driver."""
    with Driver(path, DriverParams(n_threads=2, page_size=PAGE, n_pages=n_pages, repack=False, own_kernels=False)) as drv:
        positions = list(range(start, start + len(tokens)))
        req = Req(tokens, list(range(-(-len(tokens) // PAGE))), len(tokens), positions=positions,
                  outputs=list(range(len(tokens))))
        return drv.forward(build_batch([req], PAGE)).logits


def reference(path: Path, tokens: list[int], n_ctx: int = 256, start: int = 0) -> np.ndarray:
    with LlamaRef(path, n_ctx=n_ctx) as ref:
        return ref.logits(tokens, start_pos=start)


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------


def rope_off(w: gguf.GGUFWriter) -> None:
    w.add_bool("granite.rope.scaling.finetuned", False)


def every_layer_slides(w: gguf.GGUFWriter) -> None:
    w.add_uint32("olmo2.attention.sliding_window_pattern", 0)


VARIANTS = {
    # OLMo 3: sliding window of 8 on layers 0-2 of 4 (every 4th layer global)
    "olmo3_window": ("olmo2", {"sliding_window": 8, "n_layer": 4}, None),
    # no global layer: the graph never reads the global mask (nor, below, the positions)
    "olmo3_every_layer_slides": ("olmo2", {"sliding_window": 8}, every_layer_slides),
    "granite_ffn_bias": ("granite", {"ffn_bias": True}, None),
    "granite_no_rope": ("granite", {}, rope_off),
    "llama_fused_qkv": ("llama", {"fused_qkv": True}, None),
    # LongRoPE asked for by rope.scaling.type in a Llama file (llama.cpp's other way to it)
    "llama_longrope_type": ("llama", {"rope_scaling": "longrope", "longrope": True, "rope_orig_ctx": 64}, None),
    # Gemma 3 with no global layer: the global mask is never read
    "gemma3_every_layer_slides": ("gemma3", {},
                                  lambda w: w.add_uint32("gemma3.attention.sliding_window_pattern", 0)),
    "mistral3_ffn_bias_q8": ("mistral3", {"ffn_bias": True, "quant": "q8_0"}, None),
    # Phi-3 files may name a sliding window; llama.cpp ignores it for Phi-3, and so does the driver
    "phi3_window_ignored": ("phi3", {"sliding_window": 8}, None),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_family_variants_match_llama_cpp(tmp_path: Path, record_property, variant: str) -> None:
    arch, overrides, hook = VARIANTS[variant]
    overrides = dict(overrides)
    quant = str(overrides.pop("quant", "f32"))
    path = write_tiny_gguf(tmp_path / f"{variant}.gguf", arch, quant=quant, metadata_hook=hook, **overrides)
    got = one_request(path, TOKENS)
    compare(record_property, f"variant.{variant}", got, reference(path, TOKENS), EXACT)
    with Driver(path, DriverParams(n_threads=2, page_size=PAGE, n_pages=8)) as drv:
        window = tiny_config(arch, **overrides).sliding_window
        assert drv.info.sliding_window == (0 if arch == "phi3" else window)


def test_longrope_factors_follow_the_context(tmp_path: Path, record_property) -> None:
    """Phi-3 with an original context of 256: a pool of 256 tokens takes the short factors, one
    of 512 the long ones, as llama.cpp does for n_ctx 256 and 512; the two really differ."""
    path = write_tiny_gguf(tmp_path / "phi3.gguf", "phi3", rope_orig_ctx=256)
    short = one_request(path, TOKENS, n_pages=256 // PAGE)
    long = one_request(path, TOKENS, n_pages=512 // PAGE)
    compare(record_property, "longrope.short", short, reference(path, TOKENS, n_ctx=256), EXACT)
    compare(record_property, "longrope.long", long, reference(path, TOKENS, n_ctx=512), EXACT)
    assert not np.allclose(short, long, atol=1e-3)


def test_mistral3_temperature_and_yarn_far_past_the_original_context(tmp_path_factory, record_property) -> None:
    """Positions 300.. of an original context of 16: YaRN and the attention temperature both act."""
    path = tiny_gguf(tmp_path_factory, "mistral3")
    got = one_request(path, TOKENS, start=300, n_pages=8)
    compare(record_property, "mistral3.far", got, reference(path, TOKENS, n_ctx=512, start=300), EXACT)
    # each of Mistral 3's own keys changes the result: it is applied, not only read
    for key in ("temperature_scale", "yarn_log_mul", "yarn_beta_fast", "yarn_beta_slow"):
        without = write_tiny_gguf(tmp_path_factory.mktemp("m3") / f"no_{key}.gguf", "mistral3", **{key: 0.0})
        assert not np.allclose(one_request(without, TOKENS, start=300, n_pages=8), got, atol=1e-3), key


# ---------------------------------------------------------------------------------------------
# Greedy text
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", NEW_ARCHES)
def test_greedy_text_matches_llama_cpp(tmp_path_factory, arch: str) -> None:
    """Eight greedy tokens from the driver's own sampler (prefill, then one decode per token)
    equal llama.cpp's greedy continuation, token for token and as text."""
    path = tiny_gguf(tmp_path_factory, arch)
    with LlamaRef(path, n_ctx=256) as ref, Driver(path, DriverParams(n_threads=2, page_size=PAGE, n_pages=32)) as drv:
        prompt = ref.tokenize("the world is good and")
        seq = SeqState(range(32), PAGE)
        feed, got = prompt, []
        for _ in range(8):
            got.append(int(drv.forward(build_batch([seq.req(feed)], PAGE)).tokens[0]))
            seq.advance(feed)
            feed = [got[-1]]
        want = ref.greedy(prompt, 8)
        assert got == want
        assert ref.detokenize(got) == ref.detokenize(want) and ref.detokenize(got).strip()


# ---------------------------------------------------------------------------------------------
# Files that must not load
# ---------------------------------------------------------------------------------------------


def put(key: str, value: object) -> Callable[[gguf.GGUFWriter], None]:
    def hook(w: gguf.GGUFWriter) -> None:
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_float32(key, float(value))  # type: ignore[arg-type]

    return hook


def cut(tensor: str) -> Callable[[str, np.ndarray], np.ndarray]:
    return lambda name, t: t[:-1] if name == tensor else t


@dataclass(frozen=True)
class BadFile:
    arch: str
    status: str  # the DriverError status loading it gives
    fragments: tuple[str, ...]  # parts of the message
    overrides: dict[str, object] = field(default_factory=dict)  # write_tiny_gguf keywords
    meta: Callable[[gguf.GGUFWriter], None] | None = None
    tensors: Callable[[str, np.ndarray], np.ndarray | None] | None = None


NAN, INF = float("nan"), float("inf")
# A key the writer would write itself is switched off in overrides (0 = not written), then
# written by the hook with the bad value.
BAD_FILES = {
    "granite_logit_scale_missing": BadFile("granite", "format", ("granite.logit_scale",), {"logit_scale": 0.0}),
    "granite_logit_scale_zero": BadFile("granite", "format", ("granite.logit_scale", "> 0"), {"logit_scale": 0.0},
                                        put("granite.logit_scale", 0.0)),
    "granite_logit_scale_nan": BadFile("granite", "format", ("granite.logit_scale", "finite"), {"logit_scale": 0.0},
                                       put("granite.logit_scale", NAN)),
    "granite_residual_negative": BadFile("granite", "format", ("granite.residual_scale",), {"residual_scale": 0.0},
                                         put("granite.residual_scale", -0.5)),
    "granite_embedding_inf": BadFile("granite", "format", ("granite.embedding_scale",), {"embedding_scale": 0.0},
                                     put("granite.embedding_scale", INF)),
    "granite_attention_scale_nan": BadFile("granite", "format", ("granite.attention.scale",),
                                           {"attention_scale": 0.0}, put("granite.attention.scale", NAN)),
    "granite_rope_switch_not_bool": BadFile("granite", "format", ("granite.rope.scaling.finetuned", "boolean"),
                                            meta=put("granite.rope.scaling.finetuned", "no")),
    "granite_vision_deepstack": BadFile("granite", "unsupported", ("deepstack",),
                                        meta=put("granite.deepstack_mapping", 1.0)),
    "phi3_attn_factor_zero": BadFile("phi3", "format", ("phi3.rope.scaling.attn_factor",), {"rope_attn_factor": 0.0},
                                     put("phi3.rope.scaling.attn_factor", 0.0)),
    "phi3_fused_qkv_shape": BadFile("phi3", "format", ("blk.1.attn_qkv.weight", "shape"),
                                    tensors=cut("blk.1.attn_qkv.weight")),
    "phi3_fused_gate_up_shape": BadFile("phi3", "format", ("blk.0.ffn_up.weight", "shape"),
                                        tensors=cut("blk.0.ffn_up.weight")),
    "phi3_rope_factors_length": BadFile("phi3", "format", ("rope_factors_long.weight", "shape"),
                                        tensors=cut("rope_factors_long.weight")),
    "olmo2_per_head_q_norm": BadFile("olmo2", "format", ("blk.0.attn_q_norm.weight", "shape"),
                                     tensors=lambda name, t: t[:16] if name == "blk.0.attn_q_norm.weight" else t),
    "olmo2_missing_post_norm": BadFile("olmo2", "format", ("blk.1.post_ffw_norm.weight", "missing"),
                                       tensors=lambda name, t: None if name == "blk.1.post_ffw_norm.weight" else t),
    "mistral3_temperature_nan": BadFile("mistral3", "format", ("mistral3.attention.temperature_scale",),
                                        {"temperature_scale": 0.0},
                                        put("mistral3.attention.temperature_scale", NAN)),
    "mistral3_temperature_negative": BadFile("mistral3", "format", ("mistral3.attention.temperature_scale",),
                                             {"temperature_scale": 0.0},
                                             put("mistral3.attention.temperature_scale", -0.1)),
    "mistral3_beta_fast_negative": BadFile("mistral3", "format", ("mistral3.rope.scaling.yarn_beta_fast",),
                                           {"yarn_beta_fast": 0.0},
                                           put("mistral3.rope.scaling.yarn_beta_fast", -32.0)),
    "mistral3_log_mul_inf": BadFile("mistral3", "format", ("mistral3.rope.scaling.yarn_log_multiplier",),
                                    {"yarn_log_mul": 0.0}, put("mistral3.rope.scaling.yarn_log_multiplier", INF)),
    "mistral4_is_not_supported": BadFile("llama", "unsupported", ("unsupported architecture 'mistral4'",),
                                         {"arch_name": "mistral4"}),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_hyper_parameters_are_refused(tmp_path: Path, case: str) -> None:
    bad = BAD_FILES[case]
    path = write_tiny_gguf(tmp_path / f"{case}.gguf", bad.arch, metadata_hook=bad.meta, tensor_hook=bad.tensors,
                           **bad.overrides)  # type: ignore[arg-type]
    with pytest.raises(DriverError) as err:
        Driver(path, DriverParams(n_threads=1, page_size=PAGE, n_pages=8))
    assert err.value.status == bad.status, err.value
    for fragment in bad.fragments:
        assert fragment in err.value.message, err.value.message
