"""The tiny GGUF writer itself: files are complete, typed as asked, and llama.cpp accepts them
(or, for the broken variants, rejects them), so driver tests built on them mean something."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from llama_ref import LlamaRef
from tiny_models import (
    ARCHES,
    BPE_CONTROL,
    N_VOCAB,
    N_VOCAB_BPE,
    tiny_config,
    write_shape_mismatch,
    write_tiny_gguf,
    write_truncated,
    write_unknown_arch,
    write_wrong_magic,
)

pytestmark = pytest.mark.llama_cpp


def tensor_types(path: Path) -> dict[str, tuple[gguf.GGMLQuantizationType, tuple[int, ...]]]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type, tuple(int(x) for x in t.shape)) for t in reader.tensors}


@pytest.mark.parametrize("arch", ARCHES)
def test_each_arch_loads_in_llama_cpp(tmp_path: Path, arch: str) -> None:
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch)
    cfg = tiny_config(arch)
    reader = gguf.GGUFReader(str(path))
    arch_field = reader.fields["general.architecture"]
    assert bytes(arch_field.parts[arch_field.data[0]]).decode() == arch
    types = tensor_types(path)
    assert ("output.weight" in types) is (not cfg.tied)
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    if cfg.fused_qkv:
        assert "blk.0.attn_q.weight" not in types
        assert types["blk.0.attn_qkv.weight"][1] == (cfg.n_embd, q_dim + 2 * kv_dim)  # ggml order
    else:
        assert types["blk.0.attn_q.weight"][1] == (cfg.n_embd, q_dim)
    assert ("blk.0.attn_q.bias" in types) is (arch in ("qwen2", "qwen2moe", "gpt-oss"))
    qk_norms = ("qwen3", "gemma3", "olmo2", "qwen3moe", "olmoe", "gemma3n")
    assert ("blk.0.attn_q_norm.weight" in types) is (arch in qk_norms)
    assert ("blk.0.post_ffw_norm.weight" in types) is (arch in ("gemma2", "gemma3", "olmo2", "gemma3n"))
    assert ("blk.0.attn_norm.weight" in types) is (arch != "olmo2")  # OLMo 2: post-norms only
    if cfg.n_expert:  # ggml order: [n_embd, expert width, n_expert]
        assert "blk.0.ffn_up.weight" not in types
        assert types["blk.0.ffn_up_exps.weight"][1] == (cfg.n_embd, cfg.n_ff_exp or cfg.n_ff, cfg.n_expert)
        want = gguf.GGMLQuantizationType[(cfg.expert_quant or "f32").upper()]  # gpt-oss: MXFP4
        assert types["blk.0.ffn_up_exps.weight"][0] == want
    else:
        assert types["blk.0.ffn_up.weight"][1] == (cfg.n_embd, cfg.n_ff * (2 if arch == "phi3" else 1))
        assert ("blk.0.ffn_gate.weight" in types) is (arch != "phi3")  # Phi-3 fuses gate and up
    assert ("rope_factors_long.weight" in types) is cfg.longrope
    with LlamaRef(path, n_ctx=64) as ref:
        assert ref.n_vocab == N_VOCAB and ref.n_embd == cfg.n_embd
        logits = ref.logits([1, 300, 301, 302])
        assert logits.shape == (4, N_VOCAB) and np.all(np.isfinite(logits))
        assert 0.3 < float(logits.std()) < 5.0  # O(1) logits, so comparisons are meaningful
        # the vocabulary tokenizes known words into whole-word pieces
        assert ref.detokenize(ref.tokenize("the world is good", add_bos=False)).strip() == "the world is good"
        assert len(ref.tokenize("the world is good", add_bos=False)) == 4


def test_bpe_vocabulary_loads_in_llama_cpp(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "bpe.gguf", "qwen2", vocab="bpe")
    reader = gguf.GGUFReader(str(path))
    assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    assert len(reader.fields["tokenizer.ggml.merges"].data) == N_VOCAB_BPE - 256 - len(BPE_CONTROL)  # one per word prefix
    with LlamaRef(path, n_ctx=64) as ref:
        assert ref.n_vocab == N_VOCAB_BPE
        ids = ref.tokenize(" the world is good", add_bos=False)
        assert len(ids) == 4 and ref.detokenize(ids) == " the world is good"  # merges build whole words
        odd = "Hello, World!\n\tünï 😀"
        assert ref.detokenize(ref.tokenize(odd, add_bos=False)) == odd  # anything else: byte tokens
        assert np.all(np.isfinite(ref.logits([N_VOCAB_BPE - len(BPE_CONTROL), 300, 301])))


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0", "q5_1", "q4_k", "q6_k", "iq4_xs"])
def test_quantized_weights_are_stored_as_asked(tmp_path: Path, quant: str) -> None:
    # k-quants and iq4 (quantized by ggml itself) need rows of whole 256-element blocks
    wide = {"n_embd": 256, "n_ff": 512, "head_dim": 64} if quant in ("q4_k", "q6_k", "iq4_xs") else {}
    path = write_tiny_gguf(tmp_path / f"llama-{quant}.gguf", "llama", quant=quant, **wide)
    types = tensor_types(path)
    want = gguf.GGMLQuantizationType[quant.upper()]
    assert types["blk.1.ffn_down.weight"][0] == want
    assert types["token_embd.weight"][0] == want
    assert types["blk.0.attn_norm.weight"][0] == gguf.GGMLQuantizationType.F32  # 1-D stays f32
    with LlamaRef(path, n_ctx=64) as ref:
        assert np.all(np.isfinite(ref.logits([1, 2, 3])))


def test_same_seed_same_file_different_seed_different_weights(tmp_path: Path) -> None:
    a = write_tiny_gguf(tmp_path / "a.gguf", "qwen3", seed=1).read_bytes()
    b = write_tiny_gguf(tmp_path / "b.gguf", "qwen3", seed=1).read_bytes()
    c = write_tiny_gguf(tmp_path / "c.gguf", "qwen3", seed=2).read_bytes()
    assert a == b and a != c


def test_overrides_and_bad_arguments(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "g.gguf", "gemma3", n_layer=12, sliding_window=4)
    assert "blk.11.attn_q.weight" in tensor_types(path)
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        write_tiny_gguf(tmp_path / "x.gguf", "mamba")
    with pytest.raises(ValueError, match="not a multiple of Q8_0's block 32"):
        write_tiny_gguf(tmp_path / "y.gguf", "llama", quant="q8_0", n_embd=48, head_dim=12)
    with pytest.raises(ValueError, match="unknown vocab 'wordpiece'"):
        write_tiny_gguf(tmp_path / "z.gguf", "llama", vocab="wordpiece")


def test_broken_files_are_rejected_by_llama_cpp(tmp_path: Path) -> None:
    good = write_tiny_gguf(tmp_path / "good.gguf", "llama")
    broken = [
        write_truncated(good, tmp_path / "cut.gguf"),
        write_wrong_magic(good, tmp_path / "magic.gguf"),
        write_unknown_arch(tmp_path / "arch.gguf"),
        write_shape_mismatch(tmp_path / "shape.gguf"),
    ]
    assert broken[0].stat().st_size < good.stat().st_size
    assert broken[1].read_bytes()[:4] == b"GGML"
    for path in broken:
        with pytest.raises(RuntimeError, match="could not load"):
            LlamaRef(path, n_ctx=64)
