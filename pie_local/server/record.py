"""Where a running `pie-local serve` listens, so local clients find it.

The server writes ``<data dir>/server.json`` once it is ready and removes it when it stops. A
record left behind by a crash is stale: its pid is not alive any more, and readers delete it.
There is one server per data directory; a second `serve` refuses to start while one lives.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pie_local import paths
from pie_local.runtime.ps_registry import pid_alive


@dataclass(frozen=True)
class ServerRecord:
    pid: int
    host: str  # the address it is bound to
    port: int
    url: str  # what a client on this machine connects to (loopback even when bound to 0.0.0.0)
    version: str
    api_key_required: bool = False
    api_key_file: str | None = None  # where the key is, when it was given as a file (else: PIE_LOCAL_API_KEY)
    models: list[str] = field(default_factory=list)  # loaded at start with --model
    started_at: float = field(default_factory=time.time)


def record_path() -> Path:
    return paths.home() / "server.json"


def write(record: ServerRecord) -> Path:
    """Publish ``record`` atomically (temp file + rename), readable by this user only."""
    path = record_path()
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(record), f)
    os.replace(tmp, path)
    return path


def remove(pid: int | None = None) -> None:
    """Remove the record if it is this process's (never another server's)."""
    pid = os.getpid() if pid is None else pid
    current = _load(record_path())
    if current is not None and current.pid == pid:
        record_path().unlink(missing_ok=True)


def find_server() -> ServerRecord | None:
    """The live server's record, or None. A record whose process is gone is deleted."""
    path = record_path()
    record = _load(path)
    if record is None:
        if path.exists():
            path.unlink(missing_ok=True)  # unreadable: a foreign or half-written file
        return None
    if not pid_alive(record.pid):
        path.unlink(missing_ok=True)
        return None
    return record


def _load(path: Path) -> ServerRecord | None:
    try:
        data = json.loads(path.read_text())
        return ServerRecord(**data)
    except (OSError, ValueError, TypeError):
        return None


    return True
