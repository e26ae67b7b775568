"""Corrupted GGUF files never crash pie-local: each gives a clear error or still works.

For four tiny models (SentencePiece llama, byte-level BPE qwen2, gemma3 with sliding-window
layers, gemma3n with shared KV) a few hundred seeded variants each: byte flips over the metadata, the vocabulary and the
tensor infos, edits that break the vocabulary while keeping the file parseable, absurd counts and
hyper-parameters, truncations. Each goes through `add`, the engine's load, tokenizing and a
forward pass in a child process (tests/gguf_fuzz.py). A crash or an exception that is not one of
pie-local's errors fails the test and lists the variants.
"""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

import pytest
from gguf_fuzz import Mutation, mutations, run_variants
from tiny_models import write_tiny_gguf

pytestmark = pytest.mark.real_driver

SMALL = dict(quant="q8_0", n_embd=32, n_layer=1, head_dim=8, n_head=4, n_head_kv=2, n_ff=64)
BASES = {
    "llama-spm": ("llama", "spm", {}),
    "qwen2-bpe": ("qwen2", "bpe", {}),
    "gemma3-spm": ("gemma3", "spm", {"n_layer": 6, "sliding_window": 8}),
    # 22 layers: the last 2 share KV (llama.cpp's fixed 20 owning layers)
    "gemma3n-spm": ("gemma3n", "spm", {"n_layer": 22, "sliding_window": 8}),
}


@pytest.mark.parametrize("base", BASES)
def test_no_corrupted_file_crashes(tmp_path: Path, base: str) -> None:
    arch, vocab, extra = BASES[base]
    path = write_tiny_gguf(tmp_path / "base.gguf", arch, vocab=vocab, **{**SMALL, **extra})
    muts = mutations(path, seed=10, flips=80, vocab=80, counts=40, values=30, truncations=20)
    outcomes = run_variants(path, muts, tmp_path)
    failures = [f"{muts[o.index]}\n  -> {o.result}: {o.detail}" for o in outcomes if o.result in ("crash", "bug")]
    assert not failures, f"{len(failures)} of {len(muts)} variants:\n" + "\n".join(failures)
    results = Counter(o.result for o in outcomes)
    assert results["ok"] >= 10 and results["refused"] >= 100, results  # the variants reach both ends


def test_the_harness_sees_a_crash_and_goes_on(tmp_path: Path) -> None:
    """Without pie-local's checks, two equal tokens abort the child: that variant is a crash and
    the variants after it still run."""
    path = write_tiny_gguf(tmp_path / "base.gguf", "llama", **SMALL)
    data = path.read_bytes()
    thi = data.index(struct.pack("<Q", 6) + "▁thi".encode()) + 8  # where the text of token ▁thi starts
    muts = [Mutation("truncate", len(data)), Mutation("write", thi, fmt="6s", value="▁the".encode().hex()),
            Mutation("truncate", len(data))]
    outcomes = run_variants(path, muts, tmp_path, checked=False)
    assert [o.result for o in outcomes] == ["ok", "crash", "ok"]
    assert outcomes[1].detail.startswith("exit -6")
