"""Mixture-of-experts families (qwen2moe, qwen3moe, olmoe, gpt-oss, a Mixtral-style llama)
against llama.cpp, and the files they must refuse.

The expert products are ggml's mul_mat_id. On the CPU it picks a kernel per expert by how many
rows of the whole product that expert receives: ggml's tiled kernel for k-quants and most
i-quants from 8 rows, vec_dot below and for every other type. The driver multiplies the rows
of a wide request (>= 16 tokens) in expert products of their own and narrow rows in products of
at most 7, so what an expert gets depends on the request alone (pie_matmul_id in
native/ggml_driver/src/models/common.c): a request in one pass gets llama.cpp's kernels, alone
or in a mixed batch, and its logits match bit for bit. A request prefilled in other chunks
than llama.cpp's pass can get other per-expert kernels with k-quant experts: that test keeps a
measured tolerance.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from driver_helpers import Req, SeqState, build_batch, tiny_gguf
from llama_ref import LlamaRef
from test_driver_logits import EXACT, Tolerance, compare
from tiny_models import MIXTRAL, tiny_config, write_tiny_gguf

from pie_local.driver import Driver, DriverError, DriverParams

pytestmark = pytest.mark.real_driver

PAGE = 8
# Compared exactly with llama.cpp's plain weights: repacked dense matrices (q4_k attention here)
# multiply with other kernels (tests/test_driver_repack.py checks repacking against llama.cpp's own).
PARAMS = DriverParams(n_threads=2, page_size=PAGE, n_pages=64, max_batch_tokens=256, repack=False, own_kernels=False)
# Wide enough for k-quant experts (rows of whole 256-element blocks).
WIDE = {"n_embd": 256, "n_ff": 512, "head_dim": 64, "n_ff_exp": 256}

# (name, arch, quant, overrides): every family, and expert types on both sides of ggml's
# per-expert kernel switch (f32, q8_0: vec_dot always; q4_k: tiled from 8 rows per expert)
CASES = [
    ("qwen2moe", "qwen2moe", "f32", {}),
    ("qwen3moe", "qwen3moe", "f32", {}),
    ("olmoe", "olmoe", "f32", {}),
    ("mixtral", "llama", "f32", MIXTRAL),
    ("qwen3moe-q8_0", "qwen3moe", "q8_0", {}),
    ("qwen3moe-q4_k", "qwen3moe", "q4_k", WIDE),
    ("gpt-oss", "gpt-oss", "f32", {}),  # MXFP4 experts (vec_dot at any row count)
]


def model(tmp_path_factory, case: str) -> Path:
    _, arch, quant, overrides = next(c for c in CASES if c[0] == case)
    return tiny_gguf(tmp_path_factory, arch, quant, **overrides)


def tokens(seed: int, n: int) -> list[int]:
    return [1] + np.random.default_rng(seed).integers(3, 500, n - 1).tolist()


@pytest.mark.llama_cpp
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_requests_in_a_mixed_batch_match_llama_cpp(tmp_path_factory, record_property, case: str) -> None:
    """A wide request (20 tokens) and a narrow one (5) in one batch, every row sampled, then 4
    decode steps of both in one batch: each exactly what llama.cpp gives that sequence alone
    (tolerance 0: the same kernels per expert, see the module). llama.cpp's side runs each
    sequence in one pass, or for k-quants as prompt then single-token steps: a decode row here
    takes the many-column kernel for f32 (a lone column is paired with a zero one) and vec_dot
    for k-quants, which is what llama.cpp does for those rows that way."""
    a, b = tokens(1, 20), tokens(2, 5)
    with (
        LlamaRef(model(tmp_path_factory, case), n_ctx=256, n_seq_max=2) as ref,
        Driver(model(tmp_path_factory, case), PARAMS) as drv,
    ):
        sa, sb = SeqState(range(8), PAGE), SeqState(range(8, 16), PAGE)
        first = drv.forward(build_batch([sa.req(a, outputs="all"), sb.req(b, outputs="all")], PAGE)).logits
        sa.advance(a)
        sb.advance(b)
        got_a, got_b = [first[: len(a)]], [first[len(a) :]]
        for _ in range(4):
            ta, tb = int(np.argmax(got_a[-1][-1])), int(np.argmax(got_b[-1][-1]))
            step = drv.forward(build_batch([sa.req([ta], outputs="all"), sb.req([tb], outputs="all")], PAGE)).logits
            sa.advance([ta])
            sb.advance([tb])
            got_a.append(step[:1])
            got_b.append(step[1:])
            a.append(ta)
            b.append(tb)
        ref.reset()
        if "q4_k" not in case:
            want_a, want_b = [ref.logits(a, seq_id=0)], [ref.logits(b, seq_id=1)]
        else:
            want_a, want_b = [ref.logits(a[:20], seq_id=0)], [ref.logits(b[:5], seq_id=1)]
            for i in range(4):
                want_a.append(ref.decode([a[20 + i]], [20 + i], [0], [0]))
                want_b.append(ref.decode([b[5 + i]], [5 + i], [1], [0]))
        compare(record_property, f"moe.{case}.wide", np.concatenate(got_a), np.concatenate(want_a), EXACT)
        compare(record_property, f"moe.{case}.narrow", np.concatenate(got_b), np.concatenate(want_b), EXACT)


# k-quant weights, a prompt prefilled in other chunks (13 + 17 rows) and decoded row by row,
# against llama.cpp's one pass over all 35 rows: the 13-row chunk and the decode rows take
# vec_dot where llama.cpp's pass takes the tiled kernel (dense products, and every expert that
# gets 8+ of the 35 rows), and the KV later rows read differs by that rounding. Measured (tiny
# qwen3moe, q4_k, logits std ~1.0 in [-4, 4]): max 0.090, mean 0.0089, KL 3.7e-4, top-1 1.0. Bounds ~3x that.
CHUNKED_TOL = Tolerance(max_abs=0.3, mean_abs=0.03, max_kl=2e-3, tie_gap=0.3)


@pytest.mark.llama_cpp
@pytest.mark.parametrize(("case", "tol"), [("qwen3moe", EXACT), ("qwen3moe-q4_k", CHUNKED_TOL)])
def test_chunked_prefill_then_decode_matches_llama_cpp(tmp_path_factory, record_property, case: str, tol) -> None:
    """30 tokens in chunks of 13 and 17, then 5 greedy steps, against llama.cpp's one pass over
    the same 35 tokens. f32 experts: exact (vec_dot at any row count)."""
    prompt = tokens(3, 30)
    with LlamaRef(model(tmp_path_factory, case), n_ctx=256) as ref, Driver(model(tmp_path_factory, case), PARAMS) as drv:
        seq = SeqState(range(8), PAGE)
        got = []
        for chunk in (prompt[:13], prompt[13:]):
            got.append(drv.forward(build_batch([seq.req(chunk, outputs="all")], PAGE)).logits)
            seq.advance(chunk)
        fed = []
        for _ in range(5):
            t = int(np.argmax(got[-1][-1]))
            fed.append(t)
            got.append(drv.forward(build_batch([seq.req([t], outputs="all")], PAGE)).logits)
            seq.advance([t])
        ref.reset()
        want = ref.logits(prompt + fed, rows="all")
    compare(record_property, f"moe.{case}.chunked", np.concatenate(got), want, tol)


@pytest.mark.llama_cpp
@pytest.mark.parametrize("case", ["qwen2moe", "qwen3moe", "olmoe", "mixtral", "gpt-oss"])
def test_greedy_generation_equals_llama_cpp(tmp_path_factory, case: str) -> None:
    prompt = tokens(4, 9)
    with LlamaRef(model(tmp_path_factory, case), n_ctx=256) as ref:
        want = ref.greedy(prompt, 12)
    with Driver(model(tmp_path_factory, case), PARAMS) as drv:
        seq = SeqState(range(8), PAGE)
        got, feed = [], prompt
        for _ in range(12):
            logits = drv.forward(build_batch([seq.req(feed, outputs=[len(feed) - 1])], PAGE)).logits
            seq.advance(feed)
            feed = [int(np.argmax(logits[-1]))]
            got.append(feed[0])
    assert got == want


@pytest.mark.llama_cpp
def test_gpt_oss_yarn_past_the_original_context(tmp_path_factory, record_property) -> None:
    """gpt-oss rotates every layer, sliding or not, with YaRN (factor 4 over 128 positions here):
    positions 300.. match llama.cpp exactly, and differ from the same file with scaling type
    "none" (which llama.cpp still applies, linearly, to the sliding layers: matched too)."""
    toks = tokens(7, 30)
    positions = list(range(300, 300 + len(toks)))
    req = Req(toks, list(range(4)), len(toks), positions=positions, outputs=list(range(len(toks))))
    got = {}
    for scaling in ("yarn", "none"):
        path = tiny_gguf(tmp_path_factory, "gpt-oss", rope_scaling=scaling)
        with LlamaRef(path, n_ctx=512) as ref:
            want = ref.logits(toks, start_pos=positions[0])
        with Driver(path, PARAMS) as drv:
            got[scaling] = drv.forward(build_batch([req], PAGE)).logits
        compare(record_property, f"moe.gpt-oss.rope_{scaling}", got[scaling], want, EXACT)
    assert not np.allclose(got["yarn"], got["none"], atol=1e-3)


@pytest.mark.parametrize("case", ["qwen3moe", "mixtral"])
def test_tokens_are_routed_to_different_experts(tmp_path_factory, case: str) -> None:
    """The tiny models really route: tokens differ in their top-2 experts, every expert is used,
    and the renormalised weights of each token sum to 1 (qwen3moe and Mixtral renormalise)."""
    with (
        Driver(model(tmp_path_factory, case), PARAMS) as drv,
        drv.activations(["ffn_moe_probs-0", "ffn_moe_weights_norm-0"]) as acts,
    ):
        drv.forward(build_batch([SeqState(range(4), PAGE).req(tokens(5, 24), outputs=[23])], PAGE))
    top2 = np.argsort(-acts["ffn_moe_probs-0"], axis=-1)[:, :2]
    assert len({tuple(sorted(r)) for r in top2.tolist()}) >= 3
    assert set(top2.ravel().tolist()) == set(range(4))
    np.testing.assert_allclose(acts["ffn_moe_weights_norm-0"].sum(axis=-1), 1.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Files that must not load
# ---------------------------------------------------------------------------------------------


def expect_load_error(path: Path, status: str, *fragments: str) -> None:
    with pytest.raises(DriverError) as err:
        Driver(path, PARAMS)
    assert err.value.status == status, err.value
    for fragment in fragments:
        assert fragment in err.value.message, err.value.message


@pytest.mark.parametrize(
    ("arch", "overrides", "fragments"),
    [
        ("qwen3moe", {"n_expert_used": 5}, ["qwen3moe.expert_used_count", "is 5", "1 .. qwen3moe.expert_count (4)"]),
        ("llama", {**MIXTRAL, "n_expert_used": 9}, ["llama.expert_used_count", "is 9"]),
        ("olmoe", {"n_expert_used": 0}, ["olmoe.expert_used_count", "is 0"]),
        ("qwen2moe", {"n_expert": 0, "n_expert_used": 0}, ["qwen2moe.expert_count", "missing or 0", "mixture-of-experts"]),
    ],
)
def test_bad_expert_counts(tmp_path: Path, arch: str, overrides: dict, fragments: list[str]) -> None:
    expect_load_error(write_tiny_gguf(tmp_path / "m.gguf", arch, **overrides), "format", *fragments)


def test_expert_count_zero_written_explicitly(tmp_path: Path) -> None:
    def zero(w: gguf.GGUFWriter) -> None:
        w.add_expert_count(0)

    path = write_tiny_gguf(tmp_path / "m.gguf", "qwen3moe", n_expert=0, n_expert_used=0, metadata_hook=zero)
    expect_load_error(path, "format", "qwen3moe.expert_count", "missing or 0")


def test_more_experts_than_llama_cpp_allows(tmp_path: Path) -> None:
    def many(w: gguf.GGUFWriter) -> None:
        w.add_expert_count(2000)
        w.add_expert_used_count(2)

    path = write_tiny_gguf(tmp_path / "m.gguf", "llama", metadata_hook=many)
    expect_load_error(path, "format", "llama.expert_count", "is 2000", "0 .. 1024")


def test_per_layer_expert_counts_are_refused(tmp_path: Path) -> None:
    def per_layer(w: gguf.GGUFWriter) -> None:
        w.add_array("llama.expert_count", [4, 4])
        w.add_expert_used_count(2)

    path = write_tiny_gguf(tmp_path / "m.gguf", "llama", metadata_hook=per_layer)
    expect_load_error(path, "unsupported", "llama.expert_count", "one integer")


def test_used_experts_without_experts(tmp_path: Path) -> None:
    def used(w: gguf.GGUFWriter) -> None:
        w.add_expert_used_count(2)

    path = write_tiny_gguf(tmp_path / "m.gguf", "llama", metadata_hook=used)
    expect_load_error(path, "format", "llama.expert_used_count", "no experts")


@pytest.mark.parametrize(
    ("tensor", "cut", "fragment"),
    [
        ("blk.1.ffn_up_exps.weight", lambda t: t[:-1], "[64, 32, 3, 1]"),  # an expert too few
        ("blk.0.ffn_down_exps.weight", lambda t: t[:, :, :-1], "[31, 64, 4, 1]"),  # rows too short
        ("blk.0.ffn_gate_exps.weight", lambda t: t[0], "[64, 32, 1, 1]"),  # 2-D instead of 3-D
        ("blk.0.ffn_gate_inp.weight", lambda t: t[:-1], "[64, 3, 1]"),  # router for 3 experts
        ("blk.0.ffn_gate_inp_shexp.weight", lambda t: t[:-1], "[63, 1]"),
        ("blk.1.ffn_down_shexp.weight", lambda t: t[:, :-1], "[95, 64, 1]"),
    ],
)
def test_wrong_expert_tensor_shapes(tmp_path: Path, tensor: str, cut, fragment: str) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", "qwen2moe", tensor_hook=lambda n, t: cut(t) if n == tensor else t)
    expect_load_error(path, "format", tensor, "shape", fragment)


def test_missing_expert_tensors(tmp_path: Path) -> None:
    # qwen3moe's tensors under the name qwen2moe: no shared expert
    path = write_tiny_gguf(tmp_path / "m.gguf", "qwen3moe", arch_name="qwen2moe")
    expect_load_error(path, "format", "tensor 'blk.0.ffn_gate_inp_shexp.weight' is missing")
    # a llama file that announces experts but has a dense FFN
    def experts(w: gguf.GGUFWriter) -> None:
        w.add_expert_count(4)
        w.add_expert_used_count(2)

    path = write_tiny_gguf(tmp_path / "m2.gguf", "llama", metadata_hook=experts)
    expect_load_error(path, "format", "tensor 'blk.0.ffn_gate_inp.weight' is missing")


def test_expert_weights_of_a_type_ggml_cannot_multiply(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", "olmoe",
                           tensor_hook=lambda n, t: t.astype(np.int32) if n == "blk.0.ffn_up_exps.weight" else t)
    expect_load_error(path, "unsupported", "blk.0.ffn_up_exps.weight", "i32")


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ({"n_ff_exp": 0}, ["gpt-oss.expert_feed_forward_length", "missing"]),
        ({"sliding_window": 0}, ["gpt-oss.attention.sliding_window", "missing"]),
    ],
)
def test_gpt_oss_required_keys(tmp_path: Path, overrides: dict, fragments: list[str]) -> None:
    if overrides.get("n_ff_exp") == 0:  # experts then as wide as feed_forward_length
        overrides = {**overrides, "n_ff": 64}
    expect_load_error(write_tiny_gguf(tmp_path / "m.gguf", "gpt-oss", **overrides), "format", *fragments)


def test_gpt_oss_expert_biases_must_be_f32(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", "gpt-oss",
                           tensor_hook=lambda n, t: t.astype(np.float16) if n == "blk.1.ffn_up_exps.bias" else t)
    expect_load_error(path, "unsupported", "blk.1.ffn_up_exps.bias", "f32")


def test_dense_families_ignore_expert_keys(tmp_path_factory, tmp_path: Path) -> None:
    """qwen3 files with stray expert keys load as dense models, as in llama.cpp."""

    def keys(w: gguf.GGUFWriter) -> None:
        w.add_expert_count(4)
        w.add_expert_used_count(9)

    path = write_tiny_gguf(tmp_path / "m.gguf", "qwen3", metadata_hook=keys)
    plain = tiny_gguf(tmp_path_factory, "qwen3")
    batch = build_batch([SeqState(range(2), PAGE).req(tokens(6, 6), outputs="all")], PAGE)
    with Driver(path, PARAMS) as a, Driver(plain, PARAMS) as b:
        assert np.array_equal(a.forward(batch).logits, b.forward(batch).logits)


def test_tiny_moe_configs_are_what_llama_cpp_needs() -> None:
    # llama.cpp's qwen2moe and olmoe take Q (and olmoe K, V) n_embd wide
    for arch in ("qwen2moe", "olmoe"):
        cfg = tiny_config(arch)
        assert cfg.n_head * cfg.head_dim == cfg.n_embd
    assert tiny_config("olmoe").n_head_kv == tiny_config("olmoe").n_head
