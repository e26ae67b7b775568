"""GGUF metadata reading and the memory estimate, on small GGUFs written by the gguf package."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_hub import write_gguf
from tiny_models import tiny_config, write_tiny_gguf

from pie_local.models import GGUFError
from pie_local.models.gguf_info import kv_cache_bytes, memory_estimate, read_gguf_info


def test_metadata_of_a_tiny_gguf(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "tiny-Q8_0.gguf",
        n_layers=3,
        n_embd=64,
        n_heads=4,
        n_kv_heads=2,
        context_length=512,
        vocab=300,
        chat_template="{{ messages }}",
        license="mit",
    )
    info = read_gguf_info(path)
    assert (info.arch, info.name, info.license, info.file_type) == ("llama", "Tiny Test", "mit", "Q8_0")
    assert (info.n_layers, info.context_length, info.embedding_length) == (3, 512, 64)
    assert (info.n_heads, info.n_kv_heads, info.key_length, info.value_length) == (4, 2, 16, 16)
    assert info.vocab_size == 300 and info.tokenizer_model == "llama"
    assert info.has_chat_template and info.chat_template == "{{ messages }}"
    assert info.n_tensors == 3
    assert info.n_params == 300 * 64 + 64 + 64 * 64
    mix = {q.type: (q.tensors, q.bytes) for q in info.quant_mix}
    assert mix == {"F16": (1, 300 * 64 * 2), "F32": (1, 64 * 4), "Q8_0": (1, 64 * 64 // 32 * 34)}
    assert info.weight_bytes == sum(b for _, b in mix.values())
    assert info.file_size == path.stat().st_size > info.weight_bytes


def test_kv_and_memory_estimate(tmp_path: Path) -> None:
    info = read_gguf_info(write_gguf(tmp_path / "m.gguf", n_layers=3, n_kv_heads=2, context_length=512))
    # 3 layers x 2 kv heads x (16 + 16) dims x 1000 tokens x 2 bytes (f16)
    assert kv_cache_bytes(info, 1000) == 3 * 2 * 32 * 1000 * 2
    assert kv_cache_bytes(info, 1000, "q8_0") == 3 * 2 * 32 * 1000 * 34 // 32
    assert memory_estimate(info, 1000) == info.weight_bytes + 3 * 2 * 32 * 1000 * 2
    assert memory_estimate(info) == info.weight_bytes + kv_cache_bytes(info, 512)
    with pytest.raises(ValueError, match="unknown KV type"):
        kv_cache_bytes(info, 10, "q4")


def test_gemma3n_kv_counts_only_the_layers_that_keep_it(tmp_path: Path) -> None:
    """Gemma 3n's last layers read an earlier layer's KV: 20 of the tiny model's 25 keep their own."""
    cfg = tiny_config("gemma3n")
    info = read_gguf_info(write_tiny_gguf(tmp_path / "g.gguf", "gemma3n"))
    assert kv_cache_bytes(info, 100) == 20 * cfg.n_head_kv * 2 * cfg.head_dim * 100 * 2
    bare = read_gguf_info(write_tiny_gguf(tmp_path / "bare.gguf", "gemma3n", n_layer=21,
                                          metadata_hook=lambda w: w.kv_data[0].pop("gemma3n.attention.shared_kv_layers")))
    assert kv_cache_bytes(bare, 100) == 20 * cfg.n_head_kv * 2 * cfg.head_dim * 100 * 2  # llama.cpp's fixed 20


def test_split_gguf_is_read_across_parts(tmp_path: Path) -> None:
    for i in (1, 2):
        write_gguf(tmp_path / f"m-Q8_0-0000{i}-of-00002.gguf", seed=i, split=(i, 2))
    info = read_gguf_info(tmp_path / "m-Q8_0-00002-of-00002.gguf")
    assert info.path.name == "m-Q8_0-00001-of-00002.gguf" and len(info.files) == 2
    assert info.n_tensors == 6
    (tmp_path / "m-Q8_0-00002-of-00002.gguf").unlink()
    with pytest.raises(GGUFError, match="missing m-Q8_0-00002-of-00002.gguf"):
        read_gguf_info(tmp_path / "m-Q8_0-00001-of-00002.gguf")


def test_not_a_gguf(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf_info(tmp_path / "a.gguf")
    good = write_gguf(tmp_path / "b.gguf").read_bytes()
    (tmp_path / "c.gguf").write_bytes(good[:200])
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf_info(tmp_path / "c.gguf")
    with pytest.raises(GGUFError, match="no such file"):
        read_gguf_info(tmp_path / "missing.gguf")
