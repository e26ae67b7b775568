"""GGUF files that would crash llama.cpp or the driver are refused with a clear error.

The first tests are regressions: each file really kills a process that skips the checks
(run_unchecked), and pie-local now refuses it, naming the key and the problem. Then other
impossible metadata, files that must still pass, remembered verdicts, and the child-process probe
for vocabularies the checks do not model.
"""

from __future__ import annotations

import os
import signal
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import pytest
from fake_hub import write_gguf
from gguf_fuzz import run_unchecked
from tiny_models import ARCHES, TinyVocab, write_tiny_gguf, write_truncated

from pie_local.models import CorruptGGUFError, gguf_check
from pie_local.models.gguf_check import check_model, check_vocab
from pie_local.models.store import add
from pie_local.models.tokenizer import Tokenizer, TokenizerError

pytestmark = pytest.mark.real_driver

SMALL = dict(quant="q8_0", n_embd=32, n_layer=1, head_dim=8, n_head=4, n_head_kv=2, n_ff=64)
SIGABRT = -signal.SIGABRT


def tiny(tmp_path: Path, arch: str = "llama", vocab: str = "spm", name: str = "m.gguf", **kwargs: object) -> Path:
    return write_tiny_gguf(tmp_path / name, arch, vocab=vocab, **{**SMALL, **kwargs})


def refused(path: Path, *patterns: str, by_tokenizer: bool = True) -> None:
    """`pie-local add` refuses `path` with a message naming every pattern; so does the tokenizer
    when the problem is in the vocabulary (otherwise the tokenizer loads it)."""
    with pytest.raises(CorruptGGUFError) as info:
        add(path, name="corrupt")
    message = str(info.value)
    assert str(path) in message and "corrupt GGUF" in message
    for pattern in patterns:
        assert pattern in message, message
    if by_tokenizer:
        with pytest.raises(TokenizerError, match="cannot read the vocabulary") as info:
            Tokenizer.from_gguf(path)
        assert all(pattern in str(info.value) for pattern in patterns)
    else:
        Tokenizer.from_gguf(path).close()


# ---------------------------------------------------------------------------------------------
# Regressions: files that crashed the process
# ---------------------------------------------------------------------------------------------


def make_equal(a: str, b: str) -> Callable[[TinyVocab], None]:
    def hook(v: TinyVocab) -> None:
        v.tokens[v.tokens.index(b)] = a
    return hook


@pytest.mark.parametrize("vocab, a, b", [("spm", "▁the", "▁thi"), ("bpe", "Ġthe", "Ġthi")])
def test_two_equal_tokens(tmp_path: Path, vocab: str, a: str, b: str) -> None:
    """A flipped byte made two tokens equal: llama.cpp's GGML_ASSERT(id_to_token.size() ==
    token_to_id.size()) in the vocabulary loader."""
    path = tiny(tmp_path, "qwen2" if vocab == "bpe" else "llama", vocab, vocab_hook=make_equal(a, b))
    assert run_unchecked(path) == SIGABRT
    refused(path, "tokenizer.ggml.tokens", f"has the token '{a}' twice")


@pytest.mark.parametrize("byte, renamed", [(0x0A, "<0x0a>"), (0x48, "<0xZZ>")])
def test_byte_token_missing(tmp_path: Path, byte: int, renamed: str) -> None:
    """A renamed <0xHH> token: SentencePiece falls back to it for text it has no piece for, and
    llama.cpp's unordered_map::at throws std::out_of_range out of llama_tokenize."""

    def rename(v: TinyVocab) -> None:
        i = v.tokens.index(f"<0x{byte:02X}>")
        v.tokens[i] = renamed
        v.types[i] = gguf.TokenType.NORMAL  # else the type check (a byte must read <0xHH>) reports it first

    path = tiny(tmp_path, vocab_hook=rename)
    assert run_unchecked(path) == SIGABRT
    refused(path, "tokenizer.ggml.tokens", f"no token for the byte 0x{byte:02X}")


def test_renamed_byte_token_keeping_its_type(tmp_path: Path) -> None:
    path = tiny(tmp_path, vocab_hook=lambda v: v.tokens.__setitem__(v.tokens.index("<0x48>"), "<0xZZ>"))
    assert run_unchecked(path) == SIGABRT
    refused(path, "tokenizer.ggml.token_type", "marks token 75 '<0xZZ>' as a byte, which must read <0xHH>")


@pytest.mark.parametrize("eps", [float("nan"), -1.0, float("-inf")])
def test_rms_epsilon_not_a_non_negative_number(tmp_path: Path, eps: float) -> None:
    """ggml's RMS norm asserts eps >= 0 (a NaN fails it too) in the middle of a forward pass; the
    driver now refuses such a file itself (exit 1, a clear error), and the check still names it first."""
    path = tiny(tmp_path, rms_eps=eps)
    assert run_unchecked(path) == 1
    refused(path, "llama.attention.layer_norm_rms_epsilon", str(eps), by_tokenizer=False)


def test_cli_add_prints_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pie_local.cli import main

    path = tiny(tmp_path, vocab_hook=make_equal("▁the", "▁thi"))
    assert main(["add", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pie-local: error: ") and "has the token '▁the' twice" in err


# ---------------------------------------------------------------------------------------------
# Other impossible metadata (refused; llama.cpp would not always crash on it)
# ---------------------------------------------------------------------------------------------


def set_type(token: str, value: int) -> Callable[[TinyVocab], None]:
    return lambda v: v.types.__setitem__(v.tokens.index(token), value)


def set_merge(index: int, value: str) -> Callable[[TinyVocab], None]:
    return lambda v: v.merges.__setitem__(index, value)


def empty_named_like(v: TinyVocab, empty: str, other: str) -> None:
    """llama.cpp names an empty token [EMPTY_<id>]; make another token read that name."""
    i = v.tokens.index(empty)
    v.tokens[i] = ""
    v.tokens[v.tokens.index(other)] = f"[EMPTY_{i}]"


VOCAB_CASES = {
    "merge of a missing token": ("bpe", set_merge(0, "Ġ zz"), "tokenizer.ggml.merges", "merge 0 'Ġ zz'"),
    "merge into a missing token": ("bpe", set_merge(0, "Ġ Q"), "tokenizer.ggml.merges", "merge 0 'Ġ Q'"),
    "merge without a space": ("bpe", set_merge(0, "Ġt"), "tokenizer.ggml.merges", "merge 0 'Ġt'"),
    "no merges": ("bpe", lambda v: setattr(v, "merges", None), "tokenizer.ggml.merges", "is missing"),
    "unknown token type": ("spm", set_type("▁the", 9), "tokenizer.ggml.token_type", "the type 9"),
    "negative token type": ("bpe", set_type("Ġthe", -1), "tokenizer.ggml.token_type", "the type -1"),
    "byte type on a text token": ("spm", set_type("a", 6), "tokenizer.ggml.token_type", "'a' as a byte"),
    "too few types": ("spm", lambda v: setattr(v, "types", v.types[:100]), "tokenizer.ggml.token_type",
                      "has 100 entries for"),
    "too few scores": ("spm", lambda v: setattr(v, "scores", v.scores[:10]), "tokenizer.ggml.scores",
                       "has 10 entries for"),
    "bos outside the vocabulary": ("spm", lambda v: setattr(v, "bos", 5000), "tokenizer.ggml.bos_token_id",
                                   "is 5000, outside the vocabulary"),
    "eos outside the vocabulary": ("bpe", lambda v: setattr(v, "eos", 2**31), "tokenizer.ggml.eos_token_id",
                                   "outside the vocabulary"),
    "empty token named like another": ("spm", lambda v: empty_named_like(v, "▁thi", "▁the"),
                                       "tokenizer.ggml.tokens", "'[EMPTY_"),
}


@pytest.mark.parametrize("case", VOCAB_CASES)
def test_impossible_vocabulary(tmp_path: Path, case: str) -> None:
    vocab, hook, key, problem = VOCAB_CASES[case]
    path = tiny(tmp_path, "qwen2" if vocab == "bpe" else "llama", vocab, vocab_hook=hook)
    refused(path, key, problem)


HPARAM_CASES = {
    "rope base 0": (dict(rope_base=0.0), None, "llama.rope.freq_base", "must be > 0"),
    "rope base NaN": (dict(rope_base=float("nan")), None, "llama.rope.freq_base", "finite"),
    "rms epsilon infinite": (dict(rms_eps=float("inf")), None, "layer_norm_rms_epsilon", "finite"),
    "rope scaling NaN": ({}, lambda w: w.add_float32("llama.rope.scaling.factor", float("nan")),
                         "llama.rope.scaling.factor", "finite"),
    "rope scaling negative": ({}, lambda w: w.add_float32("llama.rope.scaling.factor", -2.0),
                              "llama.rope.scaling.factor", "must be >= 0"),
    "no layers": (dict(n_layer=0), None, "llama.block_count", "is 0; it must be from 1"),
    "context length 0": (dict(n_ctx=0), None, "llama.context_length", "is 0"),
}


@pytest.mark.parametrize("case", HPARAM_CASES)
def test_impossible_hyper_parameters(tmp_path: Path, case: str) -> None:
    overrides, hook, key, problem = HPARAM_CASES[case]
    refused(tiny(tmp_path, metadata_hook=hook, **overrides), key, problem, by_tokenizer=False)


def tensor_type_offset(path: Path, tensor: str) -> int:
    """Byte offset of `tensor`'s type in the tensor infos."""
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == tensor)
    return t.field.offset + sum(p.nbytes for p in t.field.parts[:4])  # name length, name, n_dims, dims


def test_weight_types_ggml_cannot_multiply(tmp_path: Path) -> None:
    good = tiny(tmp_path)
    offset = tensor_type_offset(good, "blk.0.ffn_up.weight")
    for type_id, problem in [(gguf.GGMLQuantizationType.I32, "is a I32 matrix; ggml cannot multiply"),
                             (77, "has type 77, which ggml does not know")]:
        data = bytearray(good.read_bytes())
        struct.pack_into("<I", data, offset, type_id)
        path = tmp_path / f"type-{type_id}.gguf"
        path.write_bytes(bytes(data))
        with pytest.raises(CorruptGGUFError, match=f"tensor 'blk.0.ffn_up.weight' {problem}"):
            add(path, name=f"type-{type_id}")


def test_tensor_data_past_the_end(tmp_path: Path) -> None:
    path = write_truncated(tiny(tmp_path), tmp_path / "cut.gguf", 0.9)
    with pytest.raises(CorruptGGUFError, match=r"tensor '.*' \(.*\) ends past the end of the file"):
        check_model(path)
    check_vocab(path)  # the vocabulary is in the header, which is whole


# ---------------------------------------------------------------------------------------------
# Files that pass
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("vocab", ["spm", "bpe"])
def test_valid_tiny_models_pass(tmp_path: Path, arch: str, vocab: str) -> None:
    check_model(write_tiny_gguf(tmp_path / "m.gguf", arch, vocab=vocab))


@pytest.mark.parametrize("pattern", [0, 1, 7])
def test_gemma3_with_one_kind_of_layer_runs(tmp_path: Path, pattern: int) -> None:
    """All sliding-window layers (pattern 0 or >= n_layer + 1) or none (1): the graph reads only
    one of the driver's two attention masks, and the other gets no data (it once aborted ggml)."""
    path = tiny(tmp_path, "gemma3", n_layer=6, sliding_window=8,
                metadata_hook=lambda w: w.add_uint32("gemma3.attention.sliding_window_pattern", pattern))
    assert run_unchecked(path) == 0
    check_model(path)


def test_real_and_hub_style_files_pass(tmp_path: Path, starter_gguf: Path) -> None:
    check_model(starter_gguf)
    check_model(write_gguf(tmp_path / "hub.gguf"))


def test_a_merge_may_split_at_a_later_space(tmp_path: Path) -> None:
    def hook(v: TinyVocab) -> None:  # tokens that hold a space, and the merge of two of them
        v.tokens += ["a b", "a bĠ"]
        v.types += [1, 1]
        v.merges.append("a b Ġ")

    check_vocab(tiny(tmp_path, "qwen2", "bpe", vocab_hook=hook))


# ---------------------------------------------------------------------------------------------
# Remembered verdicts
# ---------------------------------------------------------------------------------------------


def fail_if_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def no(*args: object, **kwargs: object) -> None:
        raise AssertionError("the header was read again")

    monkeypatch.setattr(gguf_check, "read_gguf_header", no)


def test_a_verdict_is_remembered_until_the_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = tiny(tmp_path)
    bad = tiny(tmp_path, name="bad.gguf", rms_eps=-1.0)
    check_model(good)
    with pytest.raises(CorruptGGUFError) as first:
        check_model(bad)
    with monkeypatch.context() as m:
        fail_if_read(m)
        check_model(good)
        check_vocab(good)  # a passed model check covers the vocabulary
        with pytest.raises(CorruptGGUFError) as again:
            check_model(bad)
        assert str(again.value) == str(first.value)
        st = good.stat()
        os.utime(good, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        with pytest.raises(AssertionError, match="read again"):
            check_model(good)


# ---------------------------------------------------------------------------------------------
# The probe: vocabularies the checks do not model run once in a child process
# ---------------------------------------------------------------------------------------------


def write_t5_vocab(path: Path, charsmap: bytes | None = None) -> Path:
    """A vocabulary-only GGUF with a Unigram ("t5") tokenizer, which the static checks do not model."""
    tokens = ["<pad>", "</s>", "<unk>", "▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["▁hello", "▁world"]
    w = gguf.GGUFWriter(str(path), "t5")
    w.add_tokenizer_model("t5")
    w.add_token_list(tokens)
    w.add_token_scores([0.0, 0.0, 0.0, -2.0] + [-3.0] * 26 + [-1.0, -1.0])
    w.add_token_types([3, 3, 2] + [1] * (len(tokens) - 3))
    if charsmap is not None:
        w.add_precompiled_charsmap(charsmap)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def abort_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on the probe's child process aborts, whatever the file."""
    monkeypatch.setattr(gguf_check, "_probe_command", lambda path: [sys.executable, "-c", "import os; os.abort()"])


def test_probe_passes_a_working_vocabulary_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_t5_vocab(tmp_path / "t5.gguf")
    check_vocab(path)
    abort_instead(monkeypatch)
    check_vocab(path)  # remembered: no second probe
    assert Tokenizer.from_gguf(path).encode("hello world")


def test_probe_catches_a_crash_the_checks_do_not_model(tmp_path: Path) -> None:
    """A normalisation table (precompiled_charsmap) whose XCDA nodes point past its end: 'H'
    makes llama.cpp throw out of llama_tokenize; '\\n' (tokenized at load) does not."""
    path = write_t5_vocab(tmp_path / "t5.gguf", charsmap=struct.pack("<I", 64) + bytes(64) + b"\0")
    with pytest.raises(CorruptGGUFError, match=r"llama.cpp crashed \(SIGABRT\) reading its 't5' vocabulary"):
        check_vocab(path)
    with pytest.raises(TokenizerError, match="crashed"):
        Tokenizer.from_gguf(path)


def test_modelled_vocabularies_are_not_probed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    abort_instead(monkeypatch)
    check_vocab(tiny(tmp_path, "llama", "spm", name="spm.gguf"))
    check_vocab(tiny(tmp_path, "qwen2", "bpe", name="bpe.gguf"))
    with pytest.raises(CorruptGGUFError, match="crashed"):
        check_vocab(write_t5_vocab(tmp_path / "t5.gguf"))
