"""Refuse impossible GGUF files before llama.cpp or the driver sees them.

llama.cpp and ggml assert on things no valid file has (two equal tokens, a NaN norm epsilon, a
SentencePiece vocabulary without a byte token it falls back to, ...), and a failed assert aborts
the whole process. These checks read the header only (no weights) and raise CorruptGGUFError
naming the key and the problem:

    check_vocab(path)   what the tokenizer needs: llama.cpp's vocabulary loader and tokenizer
    check_model(path)   check_vocab, plus what the driver needs: hyper-parameters, tensor infos

The vocabulary checks model llama.cpp's SentencePiece ("llama") and byte-level BPE ("gpt2")
tokenizers, those of the architectures pie-local runs. A vocabulary of another type is loaded
and exercised once in a child process instead, which may crash without harm. Verdicts are
remembered in the data directory by (path, size, mtime), so each file is checked once.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pie_local import paths
from pie_local.models.errors import CorruptGGUFError, GGUFError, UnsupportedArchitectureError
from pie_local.models.gguf_info import (
    ArrayInfo,
    GGUFHeader,
    read_gguf_header,
    split_parts,
)

CHECK_VERSION = 1  # bump when a check changes: verdicts remembered by older checks are dropped
REMEMBERED = 512  # verdicts kept in the data directory (the newest)
PROBE_TIMEOUT_S = 300

NO_VOCAB = ("none", "no_vocab")
FULL_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
               "tokenizer.ggml.merges")
INT32_MAX = 2**31 - 1
TOKEN_TYPES = range(7)  # undefined, normal, unknown, control, user-defined, unused, byte
BYTE_TYPE = 6
BYTE_TOKEN = re.compile(rb"<0x[0-9A-Fa-f]{2}>")
# Bytes that occur in UTF-8 text, so SentencePiece may have to spell them out as byte tokens.
UTF8_BYTES = [b for b in range(256) if b < 0xC0 or 0xC2 <= b <= 0xF4]
SPECIAL_ID = re.compile(r"tokenizer\.ggml\.\w+_token_id")

# Counts the architectures share: (key suffix, largest sane value).
COUNTS = {
    "context_length": INT32_MAX,
    "embedding_length": 1 << 20,
    "block_count": 1 << 16,
    "feed_forward_length": 1 << 24,
    "attention.head_count": 1 << 16,
    "attention.head_count_kv": 1 << 16,
    "attention.key_length": 1 << 16,
    "attention.value_length": 1 << 16,
    "rope.dimension_count": 1 << 16,
    "vocab_size": INT32_MAX,
}
NON_NEGATIVE = ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon", "attention.group_norm_epsilon",
                "attn_logit_softcapping", "final_logit_softcapping",
                "rope.scaling.factor", "rope.scale_linear")  # a scaling factor of 0 means none
POSITIVE = ("rope.freq_base", "rope.freq_base_swa", "rope.scaling.attn_factor")

# Weight types with a matrix product in ggml's CPU backend (and dequantization for get_rows).
MATMUL_TYPES = frozenset({
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "IQ1_M", "TQ1_0", "TQ2_0",
    "MXFP4",
})

# What the probe tokenizes: ASCII, every Latin-1 character, several scripts, emoji, markup.
PROBE_TEXT = ("".join(map(chr, range(1, 0x100))) + "\x00 Hello, World! héllo 日本語 한국어 العربية Ελληνικά "
              "🎉👍🏽 \U0001F9D1\u200D\U0001F4BB <s></s><unk><|endoftext|><|im_start|><|im_end|> [CLS][SEP][MASK]")


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def check_vocab(path: str | os.PathLike[str]) -> None:
    """Raise CorruptGGUFError if llama.cpp's tokenizer could crash on this file's vocabulary
    (GGUFError if it is no readable GGUF at all)."""
    first = split_parts(Path(path))[0]  # a split GGUF keeps its metadata in the first part
    _remembered("vocab", first, lambda: _check_vocab(first))


def check_model(path: str | os.PathLike[str]) -> None:
    """check_vocab, then the hyper-parameters and tensor infos the driver loads (every part of a
    split GGUF)."""
    parts = split_parts(Path(path))

    def run() -> None:
        header = _check_vocab(parts[0])
        _save_verdict(_verdict_key("vocab", parts[0]), "")  # spares the tokenizer checking it again
        _check_hparams(header)
        _check_tensors(header)
        for part in parts[1:]:
            _check_tensors(read_gguf_header(part))

    _remembered("model", parts[0], run)


def supported_architectures() -> tuple[str, ...] | None:
    """The architectures the native driver runs, or None without a usable driver (its own error,
    with the fix, comes when a model is loaded)."""
    from pie_local.driver import supported_architectures as from_driver

    try:
        return from_driver()
    except RuntimeError:  # DriverNotFound, AbiMismatch
        return None


def check_architecture(path: str | os.PathLike[str], arch: str) -> None:
    """UnsupportedArchitectureError, naming the architecture and the supported ones, for a model
    the driver would refuse to load."""
    supported = supported_architectures()
    if supported is not None and arch not in supported:
        raise UnsupportedArchitectureError(path, arch, supported)


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------


def _bad(header: GGUFHeader, key: str, problem: str) -> CorruptGGUFError:
    return CorruptGGUFError(f"{header.path}: corrupt GGUF: {key} {problem}")


def _show(token: bytes) -> str:
    return repr(token.decode("utf-8", errors="replace"))


def _check_vocab(path: Path) -> GGUFHeader:
    """The header of `path`, its vocabulary checked (by the probe where not modelled here)."""
    header = read_gguf_header(path, full_arrays=FULL_ARRAYS)
    meta = header.metadata
    model = meta.get("tokenizer.ggml.model")
    if not isinstance(model, str):
        raise _bad(header, "tokenizer.ggml.model", "is missing or not a string: the file has no usable vocabulary")
    if model in NO_VOCAB:
        return header
    tokens = _tokens(header)
    _check_scores_and_types(header, tokens)
    _check_special_ids(header, len(tokens))
    if model == "llama":
        _check_byte_fallback(header, set(tokens))
    elif model == "gpt2":
        _check_merges(header, set(tokens))
    else:
        _probe_vocab(path, model)
    return header


def _tokens(header: GGUFHeader) -> list[bytes]:
    """The token texts, after checking they are unique (llama.cpp asserts they are)."""
    key = "tokenizer.ggml.tokens"
    tokens = header.metadata.get(key)
    if not isinstance(tokens, list):
        raise _bad(header, key, "is missing or not an array of strings")
    if not tokens:
        raise _bad(header, key, "is empty")
    if len(tokens) > INT32_MAX:
        raise _bad(header, key, f"has {len(tokens)} tokens (at most {INT32_MAX})")
    # llama.cpp names an empty token after its id
    tokens = [text or f"[EMPTY_{i}]".encode() for i, text in enumerate(tokens)]
    if len(set(tokens)) < len(tokens):
        first: dict[bytes, int] = {}
        for i, text in enumerate(tokens):
            if first.setdefault(text, i) != i:
                raise _bad(header, key, f"has the token {_show(text)} twice (ids {first[text]} and {i})")
    return tokens


def _check_scores_and_types(header: GGUFHeader, tokens: list[bytes]) -> None:
    n = len(tokens)
    scores = header.metadata.get("tokenizer.ggml.scores")
    if scores is not None:
        if not isinstance(scores, np.ndarray) or scores.dtype not in (np.float32, np.int32):
            raise _bad(header, "tokenizer.ggml.scores", "is not an array of float32 or int32")
        if len(scores) < n:
            raise _bad(header, "tokenizer.ggml.scores", f"has {len(scores)} entries for {n} tokens")
    types = header.metadata.get("tokenizer.ggml.token_type")
    if types is None:
        return
    key = "tokenizer.ggml.token_type"
    if not isinstance(types, np.ndarray) or types.dtype != np.int32:
        raise _bad(header, key, "is not an array of int32")
    if len(types) < n:
        raise _bad(header, key, f"has {len(types)} entries for {n} tokens")
    types = types[:n]
    wrong = np.flatnonzero((types < TOKEN_TYPES.start) | (types >= TOKEN_TYPES.stop))
    if len(wrong):
        raise _bad(header, key, f"gives token {wrong[0]} the type {types[wrong[0]]}, which does not exist (0-6)")
    if header.metadata["tokenizer.ggml.model"] == "llama":  # SentencePiece reads a byte token's value from its text
        for i in np.flatnonzero(types == BYTE_TYPE):
            if not BYTE_TOKEN.fullmatch(tokens[i]):
                raise _bad(header, key, f"marks token {i} {_show(tokens[i])} as a byte, which must read <0xHH>")


def _check_special_ids(header: GGUFHeader, n: int) -> None:
    for key, value in header.metadata.items():
        if not SPECIAL_ID.fullmatch(key):
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise _bad(header, key, f"is {value!r}, not a token id")
        if not 0 <= value < n:
            raise _bad(header, key, f"is {value}, outside the vocabulary (0-{n - 1})")


def _check_byte_fallback(header: GGUFHeader, tokens: set[bytes]) -> None:
    """SentencePiece spells out text it has no piece for as byte tokens, and llama.cpp throws
    out of the C API (ending the process) when a byte has neither <0xHH> nor a one-byte token."""
    for b in UTF8_BYTES:
        if f"<0x{b:02X}>".encode() not in tokens and (b == 0 or bytes([b]) not in tokens):
            raise _bad(header, "tokenizer.ggml.tokens", f"has no token for the byte 0x{b:02X} (<0x{b:02X}>), "
                                                        "which the SentencePiece tokenizer falls back to")


def _check_merges(header: GGUFHeader, tokens: set[bytes]) -> None:
    """Every BPE merge joins two tokens into a third (the Hugging Face tokenizers library refuses
    merges that do not, so only a damaged file has them)."""
    key = "tokenizer.ggml.merges"
    merges = header.metadata.get(key)
    if not isinstance(merges, list):
        raise _bad(header, key, "is missing or not an array of strings (a BPE vocabulary needs its merges)")
    for rank, merge in enumerate(merges):
        if not any(merge[:i] in tokens and merge[i + 1 :] in tokens and merge[:i] + merge[i + 1 :] in tokens
                   for i in _spaces(merge)):
            raise _bad(header, key, f"has merge {rank} {_show(merge)}, which does not join two tokens into a token")


def _spaces(merge: bytes) -> list[int]:
    """Where a merge may split: at a space, neither first nor last (tokens may contain spaces)."""
    return [i for i in range(1, len(merge) - 1) if merge[i] == 0x20]


# ---------------------------------------------------------------------------------------------
# Hyper-parameters and tensors
# ---------------------------------------------------------------------------------------------


def _check_hparams(header: GGUFHeader) -> None:
    meta = header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        return  # the driver refuses the file with a clear message
    prefix = f"{arch}."
    for suffix, limit in COUNTS.items():
        _check_count(header, prefix + suffix, meta.get(prefix + suffix), limit)
    for key, value in meta.items():
        if not key.startswith(prefix) or not isinstance(value, float):
            continue
        suffix = key[len(prefix):]
        if not math.isfinite(value):
            raise _bad(header, key, f"is {value}; a hyper-parameter must be a finite number")
        if suffix in NON_NEGATIVE and value < 0:
            raise _bad(header, key, f"is {value}; it must be >= 0")
        if suffix in POSITIVE and value <= 0:
            raise _bad(header, key, f"is {value}; it must be > 0")


def _check_count(header: GGUFHeader, key: str, value: Any, limit: int) -> None:
    """A count is a positive integer, or per layer an array of integers (0 where a layer has none)."""
    if value is None or isinstance(value, ArrayInfo):
        return
    if isinstance(value, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= limit for v in value):
            raise _bad(header, key, f"holds a value that is not a count from 0 to {limit}")
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(header, key, f"is {value!r}, not an integer")
    if not 1 <= value <= limit:
        raise _bad(header, key, f"is {value}; it must be from 1 to {limit}")


def _check_tensors(header: GGUFHeader) -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    room = header.file_size - header.data_offset
    for t in header.tensors:
        try:
            qtype = GGMLQuantizationType(t.type_id)
            block, block_bytes = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise _bad(header, f"tensor '{t.name}'", f"has type {t.type_id}, which ggml does not know") from None
        if len(t.dims) >= 2 and qtype.name not in MATMUL_TYPES:
            raise _bad(header, f"tensor '{t.name}'", f"is a {qtype.name} matrix; ggml cannot multiply by that type")
        row = t.dims[0] if t.dims else 1
        if row % block:
            raise _bad(header, f"tensor '{t.name}'", f"has rows of {row} values, not a multiple of "
                                                     f"{qtype.name}'s block of {block}")
        size = t.n_elements // block * block_bytes
        if t.offset > room or size > room - t.offset:
            raise _bad(header, f"tensor '{t.name}'", f"({'x'.join(map(str, t.dims))} {qtype.name}) ends past the "
                                                     "end of the file (truncated, or its shape is wrong)")


# ---------------------------------------------------------------------------------------------
# The probe: a vocabulary these checks do not model, loaded in a child process
# ---------------------------------------------------------------------------------------------


def _probe_vocab(path: Path, model: str) -> None:
    """Raises CorruptGGUFError if the child dies; GGUFError (not remembered: it may pass next
    time) if it fails in another way or runs out of time."""
    env = dict(os.environ, GGML_NO_BACKTRACE="1")  # a crash would otherwise start gdb for a backtrace
    package_root = str(Path(__file__).resolve().parents[2])  # so the child imports this very pie_local
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    what = f"reading its '{model}' vocabulary in a test process"
    try:
        proc = subprocess.run(_probe_command(path), capture_output=True, text=True, env=env,
                              timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise GGUFError(f"{path}: {what} did not finish in {PROBE_TIMEOUT_S} s") from None
    if proc.returncode < 0:
        raise CorruptGGUFError(f"{path}: corrupt GGUF: llama.cpp crashed ({signal.Signals(-proc.returncode).name}) "
                               f"{what}; the file is damaged or its tokenizer is one llama.cpp cannot load")
    if proc.returncode > 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise GGUFError(f"{path}: {what} failed (exit status {proc.returncode}: {last})")


def _probe_command(path: Path) -> list[str]:
    return [sys.executable, "-m", "pie_local.models.gguf_check", os.fspath(path)]


def _probe_child(path: str) -> int:
    """Load the vocabulary, tokenize, detokenize and spell every token (what pie-local does).
    Only dying counts: a Python exception is a clean failure the parent meets again itself."""
    from pie_local.models.tokenizer import Tokenizer

    try:
        tok = Tokenizer.from_gguf(path, check=False)
        ids = tok.encode(PROBE_TEXT, add_special=True, parse_special=True)
        tok.decode([t for t in ids if 0 <= t < tok.n_vocab])
        for t in range(tok.n_vocab):
            tok.piece(t)
        tok.close()
    except Exception as exc:  # noqa: BLE001
        print(f"clean failure: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# Remembered verdicts
# ---------------------------------------------------------------------------------------------


def _remembered(kind: str, path: Path, check: Callable[[], Any]) -> None:
    """Run `check` unless a verdict for this file as it is now is remembered; remember the new one."""
    try:
        key = _verdict_key(kind, path)
    except OSError:
        check()  # the check itself reports the missing file
        return
    verdicts = _load_verdicts()
    if key in verdicts:
        if verdicts[key]:
            raise CorruptGGUFError(verdicts[key])
        return
    try:
        check()
    except CorruptGGUFError as exc:
        _save_verdict(key, str(exc))
        raise
    _save_verdict(key, "")


def _verdict_key(kind: str, path: Path) -> str:
    """The file as it is now: its path, and the size and mtime of every part."""
    stats = [p.stat() for p in split_parts(path)]
    return "|".join([kind, str(CHECK_VERSION), str(path.resolve())] + [f"{st.st_size}:{st.st_mtime_ns}" for st in stats])


def _verdicts_file() -> Path:
    return paths.home() / "gguf-checks.json"


def _load_verdicts() -> dict[str, str]:
    try:
        verdicts = json.loads(_verdicts_file().read_text())
    except (OSError, ValueError):
        return {}
    return verdicts if isinstance(verdicts, dict) else {}


def _save_verdict(key: str, verdict: str) -> None:
    verdicts = _load_verdicts()
    verdicts.pop(key, None)
    verdicts[key] = verdict
    keep = dict(list(verdicts.items())[-REMEMBERED:])
    target = _verdicts_file()
    try:
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(keep))
        os.replace(tmp, target)
    except OSError:
        pass  # a read-only data directory only costs checking the file again next time


if __name__ == "__main__":
    sys.exit(_probe_child(sys.argv[1]))
