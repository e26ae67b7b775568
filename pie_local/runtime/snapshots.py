"""Named snapshots of a context: token ids + KV pages on disk, reopened after a restart.

File layout (``<snapshots dir>/<name>.piesnap``), written to a temporary file, fsynced and renamed
into place so a crash never leaves a half-written snapshot under the name:

    8 bytes   magic b"PIESNAP1"
    8 bytes   header length, little-endian
    header    UTF-8 JSON: format version, model identity, tokens, positions, pending tokens,
              chat messages, page count
    pages     n_pages * page_bytes bytes, as the driver's read_pages wrote them

Opening checks the model identity (file sha256 and size, architecture, page size, KV type, page
bytes): KV is only meaningful to the model and layout that computed it. The sha256 is one pie-local
already verified when it can (``model_sha256``), so the first open after a start does not read the
whole model file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from pie_local import paths

MAGIC = b"PIESNAP1"
VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class SnapshotError(RuntimeError):
    """A snapshot is missing, corrupt, or was made with another model or KV layout."""


def snapshot_path(name: str) -> Path:
    if not _NAME_RE.match(name) or ".." in name:
        raise SnapshotError(f"bad snapshot name {name!r}: use letters, digits, '.', '_' or '-' (max 128)")
    return paths.snapshots_dir() / f"{name}.piesnap"


def list_snapshots() -> list[dict]:
    out = []
    for path in sorted(paths.snapshots_dir().glob("*.piesnap")):
        try:
            header = read_header(path)
        except SnapshotError:
            continue
        out.append({"name": path.stem, "model": header["model"]["name"], "tokens": len(header["tokens"]) +
                    len(header["pending"]), "bytes": path.stat().st_size, "path": str(path)})
    return out


def delete_snapshot(name: str) -> None:
    path = snapshot_path(name)
    if not path.exists():
        raise SnapshotError(f"no snapshot named {name!r}")
    path.unlink()


def read_header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            if f.read(8) != MAGIC:
                raise SnapshotError(f"{path} is not a pie-local snapshot")
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size).decode())
    except FileNotFoundError:
        raise SnapshotError(f"no snapshot named {path.stem!r}") from None
    except (struct.error, ValueError) as exc:
        raise SnapshotError(f"snapshot {path} is corrupt: {exc}") from None
    if header.get("version") != VERSION:
        raise SnapshotError(f"snapshot {path} has format version {header.get('version')}; "
                            f"this pie-local reads {VERSION}")
    return header


async def save(ctx: Any, name: str) -> Path:
    """Write ``ctx`` (committed KV + pending tokens + chat messages) as snapshot ``name``."""
    path = snapshot_path(name)
    seq = ctx.sequence
    if seq.busy:
        raise SnapshotError("cannot save a context while its forward pass runs")
    engine = seq.engine
    identity = await _identity(engine)
    page_ids = ctx.page_ids
    data = await engine.run_driver(engine.driver.read_pages, page_ids) if page_ids else b""
    header = {
        "version": VERSION,
        "model": dataclasses.asdict(identity),
        "tokens": seq.committed,
        "positions": seq.positions,
        "pending": seq.pending,
        "pending_positions": seq.pending_positions,
        "canonical": seq.canonical,
        **ctx.chat_state(),
        "n_pages": len(page_ids),
    }
    blob = json.dumps(header).encode()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(blob)) + blob)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


async def load(rt: Any, name: str) -> Any:
    """A new context (of Runtime or Engine ``rt``) restored from snapshot ``name``."""
    path = snapshot_path(name)
    header = read_header(path)
    engine = getattr(rt, "engine", rt)
    identity = dataclasses.asdict(await _identity(engine))
    saved = header["model"]
    for key in ("sha256", "size", "arch", "page_size", "kv_type", "page_bytes", "n_layer"):
        if saved.get(key) != identity[key]:
            raise SnapshotError(f"snapshot {name!r} was saved with another model or KV layout "
                                f"({key}: {saved.get(key)!r} there, {identity[key]!r} here; "
                                f"model {saved.get('name')!r})")
    n_pages, page_bytes = header["n_pages"], identity["page_bytes"]
    with open(path, "rb") as f:
        f.seek(16 + _header_size(path))
        data = f.read()
    if len(data) != n_pages * page_bytes:
        raise SnapshotError(f"snapshot {name!r} is truncated: {len(data)} bytes of KV, expected {n_pages * page_bytes}")
    tokens = header["tokens"]
    if n_pages != -(-len(tokens) // identity["page_size"]):
        raise SnapshotError(f"snapshot {name!r} is corrupt: {n_pages} pages for {len(tokens)} tokens")
    ctx = rt.context()
    seq = ctx.sequence
    if seq.owner is not None:
        seq.owner.charge(tokens=0, new_pages=n_pages)
    pages = engine.pool.allocate(n_pages)
    try:
        if pages:
            await engine.run_driver(engine.driver.write_pages, [p.id for p in pages], data)
    except BaseException:
        engine.pool.release(pages)
        ctx.release()
        raise
    seq.restore(pages, tokens, header["positions"], header["pending"], header["pending_positions"],
                bool(header["canonical"]))
    ctx.restore_chat_state(header)
    return ctx


def _header_size(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(8)
        return struct.unpack("<Q", f.read(8))[0]


async def _identity(engine: Any):
    """The engine's model identity; the first time it may hash the model file, off the loop."""
    import asyncio

    return await asyncio.to_thread(engine.identity)


# ---- the model file's sha256 ----------------------------------------------------------------------

def model_sha256(path: Path) -> str:
    """The sha256 of a model file, for snapshot identity. In order: the one the models store
    recorded when it verified the file (pull, starter), one computed earlier for the same
    (path, size, mtime), else hash the file."""
    stat = path.stat()
    return _recorded_sha256(path, stat) or _hashed_sha256(path, stat)


def _recorded_sha256(path: Path, stat: os.stat_result) -> str | None:
    """Valid only while the file keeps the recorded size and was not modified after it was recorded."""
    from pie_local.models import store
    from pie_local.models.errors import ModelError

    try:
        installed = store.list_installed()
    except ModelError:  # a damaged index is the models commands' business; hash instead
        return None
    real = path.resolve()
    for model in installed:
        for f in model.files:
            if (f.sha256 and f.size == stat.st_size and stat.st_mtime <= model.added_at
                    and f.path.resolve() == real):
                return f.sha256
    return None


def _hashed_sha256(path: Path, stat: os.stat_result) -> str:
    """Hash the file once; remembered in the data directory by (path, size, mtime)."""
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = paths.home() / "model-sha256.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    cache[key] = h.hexdigest()
    try:
        tmp = cache_file.with_name(f".{cache_file.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only data dir only costs the next start another hash
    return cache[key]
