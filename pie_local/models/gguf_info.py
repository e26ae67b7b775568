"""GGUF metadata without loading weights: architecture, sizes, quant mix, memory estimate.

gguf's GGUFReader parses every array element into Python objects (17 s for a 262k-token vocab on
a small CPU), so this module reads the header itself: key/value pairs with big arrays skipped
(only their length kept), then the tensor infos. Split GGUFs (`-00001-of-0000N.gguf`) are read
across all parts. Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pie_local.models.errors import GGUFError

GGUF_MAGIC = b"GGUF"
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
MAX_ARRAY_KEPT = 64  # arrays longer than this keep only their length (vocab tables, per-token scores)
GGML_MAX_DIMS = 4

# GGUF value type id -> struct format of a scalar (8 = string, 9 = array are handled apart)
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# bytes per KV element by cache type (q8_0: 32 int8 + one f16 scale per block)
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array too long to keep: its element type and length."""

    type_id: int
    length: int


@dataclass(frozen=True)
class QuantShare:
    """How much of the model one tensor type holds."""

    type: str  # "Q4_K", "F32", ...
    tensors: int
    bytes: int


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    files: tuple[Path, ...]
    file_size: int  # bytes on disk, all parts
    version: int
    arch: str | None
    name: str | None
    size_label: str | None
    license: str | None
    file_type: str | None  # llama.cpp's label for the quant recipe, e.g. "Q4_K_M"
    n_params: int
    n_tensors: int
    weight_bytes: int
    quant_mix: tuple[QuantShare, ...]  # largest share first
    n_layers: int | None
    context_length: int | None
    embedding_length: int | None
    n_heads: int | None
    n_kv_heads: int | None
    key_length: int | None
    value_length: int | None
    sliding_window: int | None
    vocab_size: int | None
    tokenizer_model: str | None
    chat_template: str | None
    metadata: dict[str, Any] = field(repr=False)  # every key; long arrays as ArrayInfo

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "files": [str(p) for p in self.files],
            "file_size": self.file_size,
            "gguf_version": self.version,
            "arch": self.arch,
            "name": self.name,
            "size_label": self.size_label,
            "license": self.license,
            "file_type": self.file_type,
            "n_params": self.n_params,
            "n_tensors": self.n_tensors,
            "weight_bytes": self.weight_bytes,
            "quant_mix": [{"type": q.type, "tensors": q.tensors, "bytes": q.bytes} for q in self.quant_mix],
            "n_layers": self.n_layers,
            "context_length": self.context_length,
            "embedding_length": self.embedding_length,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "key_length": self.key_length,
            "value_length": self.value_length,
            "sliding_window": self.sliding_window,
            "vocab_size": self.vocab_size,
            "tokenizer_model": self.tokenizer_model,
            "has_chat_template": self.has_chat_template,
        }


# ---------------------------------------------------------------------------------------------
# Header reading
# ---------------------------------------------------------------------------------------------


class _Cursor:
    """Reads little-endian GGUF values from a byte buffer; a read past the end is a GGUFError."""

    def __init__(self, buf: Any, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated GGUF header (the file is incomplete or not a GGUF)")

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def raw_string(self) -> bytes:
        n = self.scalar("<Q")
        self._need(n)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw

    def string(self) -> str:
        return self.raw_string().decode("utf-8", errors="replace")

    def raw_strings(self, count: int) -> list[bytes]:
        """`count` strings as bytes (a loop tuned for vocabularies of 100k+ tokens)."""
        unpack, buf, pos, end = struct.unpack_from, self.buf, self.pos, len(self.buf)
        out = []
        for _ in range(count):
            if pos + 8 > end:
                raise GGUFError(f"{self.path}: truncated GGUF header")
            n = unpack("<Q", buf, pos)[0]
            pos += 8
            if pos + n > end:
                raise GGUFError(f"{self.path}: truncated GGUF header")
            out.append(bytes(buf[pos : pos + n]))
            pos += n
        self.pos = pos
        return out

    def skip_strings(self, count: int) -> None:
        unpack, buf, pos, end = struct.unpack_from, self.buf, self.pos, len(self.buf)
        for _ in range(count):
            if pos + 8 > end:
                raise GGUFError(f"{self.path}: truncated GGUF header")
            pos += 8 + unpack("<Q", buf, pos)[0]
        if pos > end:
            raise GGUFError(f"{self.path}: truncated GGUF header")
        self.pos = pos

    def numbers(self, type_id: int, count: int) -> np.ndarray:
        dtype = np.dtype(_SCALAR_FORMATS[type_id])
        self._need(dtype.itemsize * count)
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += dtype.itemsize * count
        return out

    def value(self, type_id: int, full: bool = False) -> Any:
        """One value; an array longer than MAX_ARRAY_KEPT becomes an ArrayInfo unless `full`,
        which gives every element (strings as bytes, numbers as a numpy array)."""
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if item_type == _ARRAY:
                raise GGUFError(f"{self.path}: unsupported nested array in GGUF metadata")
            if item_type not in _SCALAR_FORMATS and item_type != _STRING:
                raise GGUFError(f"{self.path}: unknown GGUF value type {item_type}")
            if full:
                return self.raw_strings(count) if item_type == _STRING else self.numbers(item_type, count)
            if count > MAX_ARRAY_KEPT:
                if item_type == _STRING:
                    self.skip_strings(count)
                else:
                    size = struct.calcsize(_SCALAR_FORMATS[item_type]) * count
                    self._need(size)
                    self.pos += size
                return ArrayInfo(item_type, count)
            return [self.value(item_type) for _ in range(count)]
        if type_id not in _SCALAR_FORMATS:
            raise GGUFError(f"{self.path}: unknown GGUF value type {type_id}")
        return self.scalar(_SCALAR_FORMATS[type_id])


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the row length
    type_id: int
    offset: int  # of its data, from the start of the data section

    @property
    def n_elements(self) -> int:
        return math.prod(self.dims)


@dataclass(frozen=True)
class GGUFHeader:
    """One GGUF file's header as stored: nothing is interpreted beyond the format itself."""

    path: Path
    file_size: int
    version: int
    metadata: dict[str, Any]  # long arrays as ArrayInfo, except the keys asked for in full
    value_types: dict[str, int]  # GGUF value type of each key (8 = string, 9 = array, ...)
    tensors: tuple[TensorInfo, ...]
    data_offset: int  # where the tensor data starts


def read_gguf_header(path: str | Path, full_arrays: Collection[str] = ()) -> GGUFHeader:
    """The header of one GGUF file (one part of a split GGUF); arrays under the keys in
    `full_arrays` are read in full. Raises GGUFError for anything that is not a readable GGUF."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise GGUFError(f"{path}: too small to be a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(_Cursor(mm, path), size, frozenset(full_arrays))
    except FileNotFoundError:
        raise GGUFError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise GGUFError(f"{path}: is a directory, not a GGUF file") from None


def _parse(cur: _Cursor, size: int, full_arrays: frozenset[str]) -> GGUFHeader:
    cur._need(4)
    if bytes(cur.buf[0:4]) != GGUF_MAGIC:
        raise GGUFError(f"{cur.path}: not a GGUF file (bad magic; expected 'GGUF')")
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise GGUFError(
            f"{cur.path}: unsupported GGUF version {version} (2 and 3 are supported; big-endian files are not)"
        )
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    metadata: dict[str, Any] = {}
    value_types: dict[str, int] = {}
    for _ in range(n_kv):
        key = cur.string()
        type_id = cur.scalar("<I")
        metadata[key] = cur.value(type_id, full=key in full_arrays)
        value_types[key] = type_id
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        if n_dims > GGML_MAX_DIMS:
            raise GGUFError(f"{cur.path}: tensor '{name}' has {n_dims} dimensions (at most {GGML_MAX_DIMS})")
        dims = tuple(cur.scalar("<Q") for _ in range(n_dims))
        type_id = cur.scalar("<I")
        tensors.append(TensorInfo(name, dims, type_id, cur.scalar("<Q")))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{cur.path}: general.alignment {alignment!r} is not a power of two")
    data_offset = -(-cur.pos // alignment) * alignment
    return GGUFHeader(cur.path, size, version, metadata, value_types, tuple(tensors), data_offset)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def split_parts(path: Path) -> tuple[Path, ...]:
    """All parts of a split GGUF given any one of them (in order), or (path,) for a single file."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return (path,)
    count = int(m["count"])
    parts = tuple(path.with_name(f"{m['stem']}-{i:05d}-of-{m['count']}.gguf") for i in range(1, count + 1))
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise GGUFError(f"{path}: split GGUF is incomplete, missing {', '.join(missing)}")
    return parts


def _type_name(type_id: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type{type_id}"


def _tensor_bytes(t: TensorInfo) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t.type_id)]
    except (ValueError, KeyError):
        return 0
    return t.n_elements // block * size


def _file_type_label(value: Any) -> str | None:
    from gguf import LlamaFileType

    if not isinstance(value, int):
        return None
    try:
        name = LlamaFileType(value).name
    except ValueError:
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _int_or_max(value: Any) -> int | None:
    """Per-layer arrays (some archs vary head counts by layer) are summarised by their maximum."""
    if isinstance(value, list) and value:
        return max(int(v) for v in value)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_gguf_info(path: str | Path) -> GGUFInfo:
    """Metadata of a GGUF file (any part of a split GGUF gives the whole model)."""
    path = Path(path).expanduser()
    parts = split_parts(path)
    first = read_gguf_header(parts[0])
    version, meta = first.version, first.metadata
    tensors = list(first.tensors)
    for part in parts[1:]:
        tensors += read_gguf_header(part).tensors

    arch = meta.get("general.architecture")
    arch = arch if isinstance(arch, str) else None

    def arch_key(suffix: str) -> Any:
        return meta.get(f"{arch}.{suffix}") if arch else None

    shares: dict[str, list[int]] = {}
    for t in tensors:
        share = shares.setdefault(_type_name(t.type_id), [0, 0])
        share[0] += 1
        share[1] += _tensor_bytes(t)
    quant_mix = tuple(sorted((QuantShare(k, v[0], v[1]) for k, v in shares.items()), key=lambda q: (-q.bytes, q.type)))

    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = tokens.length if isinstance(tokens, ArrayInfo) else len(tokens) if isinstance(tokens, list) else None
    vocab = vocab or _int_or_max(arch_key("vocab_size"))
    n_heads = _int_or_max(arch_key("attention.head_count"))
    n_embd = _int_or_max(arch_key("embedding_length"))
    head_dim = n_embd // n_heads if n_embd and n_heads else None
    template = meta.get("tokenizer.chat_template")

    def text(key: str) -> str | None:
        value = meta.get(key)
        return value if isinstance(value, str) else None

    return GGUFInfo(
        path=parts[0],
        files=parts,
        file_size=sum(p.stat().st_size for p in parts),
        version=version,
        arch=arch,
        name=text("general.name"),
        size_label=text("general.size_label"),
        license=text("general.license"),
        file_type=_file_type_label(meta.get("general.file_type")),
        n_params=sum(t.n_elements for t in tensors),
        n_tensors=len(tensors),
        weight_bytes=sum(q.bytes for q in quant_mix),
        quant_mix=quant_mix,
        n_layers=_int_or_max(arch_key("block_count")),
        context_length=_int_or_max(arch_key("context_length")),
        embedding_length=n_embd,
        n_heads=n_heads,
        n_kv_heads=_int_or_max(arch_key("attention.head_count_kv")) or n_heads,
        key_length=_int_or_max(arch_key("attention.key_length")) or head_dim,
        value_length=_int_or_max(arch_key("attention.value_length")) or head_dim,
        sliding_window=_int_or_max(arch_key("attention.sliding_window")),
        vocab_size=vocab,
        tokenizer_model=text("tokenizer.ggml.model"),
        chat_template=template if isinstance(template, str) and template else None,
        metadata=meta,
    )


def kv_layers(info: GGUFInfo) -> int | None:
    """Layers that keep KV: all, except Gemma 3n's last attention.shared_kv_layers (default: every
    layer from the 20th, llama.cpp's rule), which read an earlier layer's."""
    if info.arch != "gemma3n" or not info.n_layers:
        return info.n_layers
    shared = info.metadata.get("gemma3n.attention.shared_kv_layers", max(0, info.n_layers - 20))
    return info.n_layers - shared if isinstance(shared, int) and 0 <= shared < info.n_layers else info.n_layers


def kv_cache_bytes(info: GGUFInfo, context: int, kv_type: str = "f16") -> int:
    """Bytes of K and V for `context` tokens in every layer that keeps KV (the driver keeps full KV
    per layer, sliding-window layers included)."""
    if kv_type not in KV_TYPE_BYTES:
        raise ValueError(f"unknown KV type '{kv_type}' (choose from {', '.join(KV_TYPE_BYTES)})")
    if context <= 0:
        raise ValueError(f"context must be a positive number of tokens, got {context}")
    if not (info.n_layers and info.n_kv_heads and info.key_length and info.value_length):
        raise GGUFError(f"{info.path}: the GGUF lacks the attention shape needed to size the KV cache")
    per_token = kv_layers(info) * info.n_kv_heads * (info.key_length + info.value_length)
    return int(per_token * context * KV_TYPE_BYTES[kv_type])


def memory_estimate(info: GGUFInfo, context: int | None = None, kv_type: str = "f16") -> int:
    """Bytes for the weights plus the KV cache at `context` tokens (default: the model's own
    context length). Compute buffers and the OS are not included."""
    context = context or info.context_length
    if not context:
        raise GGUFError(f"{info.path}: no context length in the GGUF; pass one explicitly")
    return info.weight_bytes + kv_cache_bytes(info, context, kv_type)
