"""The driver's q8_0, q5_0, q4_K and q6_K products (native/ggml_driver/src/matmul_q8.c).

With DriverParams.own_kernels on (the default), on an x86 CPU with AVX-512 VNNI, the driver multiplies
q8_0, q5_0, q4_K and q6_K weights with its own kernels instead of ggml's (the k-quants with q8_K
columns, as ggml does). They quantize the columns to q8_0 the way ggml-cpu
does and sum exact integer block dots, so the head's logits must equal that arithmetic done in
float64 up to float rounding, and the same products must stay within float-order distance of
ggml's kernels (own_kernels off); every column is computed alone, so a row's logits must not depend on the
other rows of its batch. Elsewhere ggml's kernels run, and every check holds as well.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
from driver_helpers import SeqState, build_batch, cpu_has, tiny_gguf

from pie_local.driver import Driver, DriverParams

pytestmark = pytest.mark.real_driver

PAGE = 8


def vnni_cpu() -> bool:
    return cpu_has("avx512f", "avx512bw", "avx512_vnni", "f16c")


@pytest.fixture(scope="module", params=[
    # q5_0 everywhere, an untied head, 3 blocks a row (an odd count), 561 rows (the last tile of
    # 16 rows holds 1)
    dict(arch="llama", quant="q5_0", n_embd=96, head_dim=24),
    # q8_0 everywhere, a head tied to the token embedding (the starter model's head), 2 blocks a row
    dict(arch="gemma3", quant="q8_0", n_embd=64, tied=True),
], ids=["llama-q5_0-untied-96", "gemma3-q8_0-tied-64"])
def q8_model(request, tmp_path_factory) -> Path:
    spec = dict(request.param)
    return tiny_gguf(tmp_path_factory, spec.pop("arch"), **spec)


def head_weight(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The head's blocks: scales [n_vocab, n_blocks] and integer values [n_vocab, n_blocks, 32]."""
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    return weight_blocks(path, "output.weight" if "output.weight" in names else "token_embd.weight")


def weight_blocks(path: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A q8_0 or q5_0 matrix's blocks: scales [n_out, n_blocks] and integer values [n_out, n_blocks, 32]."""
    from gguf.quants import dequantize

    t = {t.name: t for t in gguf.GGUFReader(path).tensors}[name]
    assert t.tensor_type in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q5_0)
    n_in, n_out = (int(x) for x in t.shape)
    raw = np.frombuffer(t.data.tobytes(), dtype=np.uint8).reshape(n_out, n_in // 32, -1)
    scales = raw[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float64)
    # d * q is exact in float32 (|q| <= 127, d an fp16), so q comes back exactly
    values = dequantize(t.data, t.tensor_type).reshape(n_out, n_in // 32, 32).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return scales, np.rint(np.where(scales[..., None] != 0, values / scales[..., None], 0))


def q8_logits(hidden: np.ndarray, scales: np.ndarray, values: np.ndarray) -> np.ndarray:
    """What a q8_0 x q8_0 product computes, in float64: each hidden state quantized per 32-value
    block as ggml-cpu does on x86 (d = max|x| / 127 rounded to fp16, q = round-half-even(x * 127 /
    max|x|) in float32), integer block dots scaled by both blocks' scales."""
    h = hidden.astype(np.float32).reshape(len(hidden), -1, 32)
    amax = np.abs(h).max(-1)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float64)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint((h * inv[..., None]).astype(np.float32)).astype(np.float64)
    dots = np.einsum("vbk,nbk->nvb", values, q)
    return (dots * (scales[None] * d[:, None, :])).sum(-1)


def forward_rows(drv: Driver, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Every prompt as a request of one batch, every row sampled: (logits, hidden states)."""
    reqs = [SeqState(range(i * 8, i * 8 + 8), PAGE).req(p, outputs="all") for i, p in enumerate(prompts)]
    out = drv.forward(build_batch(reqs, PAGE, return_hidden=True))
    return np.asarray(out.logits), np.asarray(out.hidden)


def test_head_equals_q8_arithmetic(q8_model: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="pie_local.driver")
    scales, values = head_weight(q8_model)
    with Driver(q8_model, DriverParams(n_threads=2, page_size=PAGE, n_pages=64, own_kernels=True)) as drv:
        logits, hidden = forward_rows(drv, [[1, 5, 9, 13, 17, 21, 25], [2, 4, 6], [3]])
    assert ("q8_0, q5_0, q4_K and q6_K products: AVX-512 VNNI kernels" in caplog.text) == vnni_cpu()
    want = q8_logits(hidden, scales, values)
    # Only the order of float additions differs (exact integer dots, the same scales): a few ulps
    # of the largest partial sums. Measured max 1.5e-5 on the starter model's logits up to ~73.
    tol = 1e-5 * max(1.0, float(np.abs(want).max()))
    assert np.abs(logits - want).max() <= tol, float(np.abs(logits - want).max())


def test_row_logits_do_not_depend_on_the_batch(q8_model: Path) -> None:
    prompt = [7, 3, 11]
    others = [[i + 20, i + 40] for i in range(6)]
    with Driver(q8_model, DriverParams(n_threads=2, page_size=PAGE, n_pages=64, own_kernels=True)) as drv:
        alone, _ = forward_rows(drv, [prompt])
        for n in (1, 2, 5):  # 3 + 2n sampled rows: 5, 7, then a full group of 8 columns and 5 more
            mixed, _ = forward_rows(drv, others[:n] + [prompt])
            assert np.array_equal(mixed[-3:], alone), n


def first_projections(path: Path, own_kernels: bool, prompts: list[list[int]]) -> dict[str, np.ndarray]:
    """Layer 0's Q, K and V projections: products of the same normed input on both kernels."""
    with Driver(path, DriverParams(n_threads=2, page_size=PAGE, n_pages=64, own_kernels=own_kernels)) as drv:
        with drv.activations(["Qcur-0", "Kcur-0", "Vcur-0"]) as acts:
            forward_rows(drv, prompts)
        return {name: a.copy() for name, a in acts.items()}


def test_switched_off_keeps_ggml_kernels(q8_model: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="pie_local.driver")
    scales, values = head_weight(q8_model)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11]]
    with Driver(q8_model, DriverParams(n_threads=2, page_size=PAGE, n_pages=64, own_kernels=False)) as drv:
        logits, hidden = forward_rows(drv, prompts)
    assert "q4_K and q6_K products" not in caplog.text
    assert np.abs(logits - q8_logits(hidden, scales, values)).max() <= 1e-5 * max(1.0, float(np.abs(logits).max()))
    # the same products on both kernels differ only in the order of their float sums (measured
    # 1.5e-7 of the largest value); later layers also see the attention kernel's other rounding
    # (test_attention_cpu.py)
    ggml, own = first_projections(q8_model, False, prompts), first_projections(q8_model, True, prompts)
    for name in ggml:
        tol = 1e-5 * max(1.0, float(np.abs(ggml[name]).max()))
        assert np.abs(own[name] - ggml[name]).max() <= tol, (name, float(np.abs(own[name] - ggml[name]).max()))



@pytest.fixture(scope="module", params=["q4_k", "q6_k"])
def k_model(request, tmp_path_factory) -> Path:
    """Every matrix (the head too) in a k-quant: rows of whole 256-value super-blocks."""
    return tiny_gguf(tmp_path_factory, "llama", request.param, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, head_dim=64)


def test_k_quant_products_match_ggml(k_model: Path) -> None:
    """q4_K and q6_K products: columns quantized to q8_K as ggml does, exact integer sub-block
    dots, scales and mins applied as integers per super-block, so only the float order differs
    from ggml's kernels (which the repack path multiplies in its own order again)."""
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11]]  # 11 columns: groups of 4, 4 and 3
    ggml, own = first_projections(k_model, False, prompts), first_projections(k_model, True, prompts)
    for name in ggml:
        scale = max(1.0, float(np.abs(ggml[name]).max()))
        err = float(np.abs(own[name] - ggml[name]).max())
        assert err <= 1e-5 * scale, (name, err)


def test_k_quant_rows_do_not_depend_on_the_batch(k_model: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="pie_local.driver")
    prompt = [7, 3, 11]
    others = [[i + 20, i + 40] for i in range(6)]
    with Driver(k_model, DriverParams(n_threads=2, page_size=PAGE, n_pages=64, own_kernels=True)) as drv:
        alone, _ = forward_rows(drv, [prompt])
        for n in (1, 3, 6):  # 5, 9 and 15 sampled rows
            mixed, _ = forward_rows(drv, others[:n] + [prompt])
            assert np.array_equal(mixed[-3:], alone), n
        # the driver's kernels multiply every matrix, so ggml's repack buffer keeps none of them
        assert drv.info.n_repacked == 0 or not vnni_cpu()
    assert ("q4_K and q6_K products: AVX-512 VNNI kernels" in caplog.text) == vnni_cpu()



def gelu_table() -> np.ndarray:
    """ggml-cpu's GELU table recomputed: the tanh form at every fp16 value (here in float64; ggml
    evaluates it in float32), rounded to fp16."""
    x = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        y = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * x * (1 + 0.044715 * x * x)))
    return y.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize(("arch", "layer"), [("gemma3", 0), ("gemma3n", 24)], ids=["gemma3", "gemma3n-dense-layer"])
def test_fused_geglu_equals_ggml_arithmetic(tmp_path_factory, arch: str, layer: int) -> None:
    """Gemma's gate and up products and their GEGLU run as one op on the own kernels, spread over
    the threads by rows rather than by tokens (one decode token kept one thread busy with all of
    ggml's). Its result must be what ggml-cpu computes from the same input: both q8_0 products,
    then gelu from an fp16 table at the gate rounded to fp16 (0 at or below -10), times up. Gemma
    3n's layers without a sparse gate take it too; its result is checked through the down
    projection (that model names no GEGLU)."""
    if arch == "gemma3":
        path = tiny_gguf(tmp_path_factory, "gemma3", quant="q5_0", n_embd=64, n_ff=160)
        names = [f"ffn_norm-{layer}", f"ffn_geglu-{layer}"]
    else:
        path = tiny_gguf(tmp_path_factory, "gemma3n", quant="q8_0")
        names = [f"ffn_norm-{layer}", f"ffn_out-{layer}"]
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [12], [13, 14]]  # 14 tokens: a group of 8 columns and 6
    with Driver(path, DriverParams(n_threads=2, page_size=PAGE, n_pages=64, own_kernels=True)) as drv:
        with drv.activations(names) as acts:
            forward_rows(drv, prompts)
        x, got = acts[names[0]].copy(), acts[names[1]].copy()
    gate = q8_logits(x, *weight_blocks(path, f"blk.{layer}.ffn_gate.weight")).astype(np.float32)
    up = q8_logits(x, *weight_blocks(path, f"blk.{layer}.ffn_up.weight")).astype(np.float32)
    table = gelu_table()
    gelu = table[gate.astype(np.float16).view(np.uint16)]
    gelu = np.where(gate <= -10, 0, np.where(gate >= 10, gate, gelu))
    want = gelu * up
    if arch == "gemma3n":
        want = q8_logits(want, *weight_blocks(path, f"blk.{layer}.ffn_down.weight")).astype(np.float32)
    assert got.shape == want.shape
    scale = float(np.abs(want).max())
    close = np.abs(got - want) <= 1e-5 * np.abs(want) + 1e-6 * scale
    # The products' float order (~1e-7) and this table's float64 arithmetic can each move a value
    # across an fp16 rounding boundary: then the neighbouring entry (up to ~1% of a small value
    # in gelu's negative tail). That is rare; a wrong table entry, row or column is not.
    assert close.mean() >= 0.99, float(close.mean())
    assert np.abs(got - want).max() <= 1e-3 * scale, float(np.abs(got - want).max())
