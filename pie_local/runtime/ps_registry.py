"""How `pie-local ps` sees the inferlets of other processes.

Each Engine publishes what it is running to one small JSON file, ``<data dir>/run/<pid>-<n>.json``
(``n`` numbers the engines of one process: a server holds one per loaded model): written
atomically (temp file + rename) and refreshed every ``interval`` seconds by a `PsPublisher`,
removed when that engine stops. Readers prune files whose process is gone or which stopped being
refreshed (a crashed process, or a reused pid).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

from pie_local import paths

REFRESH_S = 1.0
STALE_AFTER_S = 30.0  # a live pid whose file is this old is not an engine any more
LIVE_STATES = ("queued", "running")  # engines keep finished inferlets in their stats for a while

_engine_numbers = itertools.count(1)  # this process's engines, in the order their publishers were made


def run_dir() -> Path:
    path = paths.home() / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def engine_snapshot(engine: Any) -> dict:
    """What one engine process publishes: its model, its stats and its running inferlets."""
    stats = _jsonable(engine.stats())
    inferlets = [row for row in stats.pop("inferlets", []) if row.get("state") in LIVE_STATES]
    return {
        "pid": os.getpid(),
        "model": str(getattr(engine, "model_name", "")),
        "updated_at": time.time(),
        "inferlets": inferlets,
        "stats": stats,
    }


def entry_path(pid: int | None = None, engine: int = 0) -> Path:
    """The run file of engine number ``engine`` of process ``pid`` (default: this process)."""
    return run_dir() / f"{os.getpid() if pid is None else pid}-{engine}.json"


def publish(snapshot: dict, pid: int | None = None, engine: int = 0) -> Path:
    """Write ``snapshot`` as the entry of one engine, atomically."""
    path = entry_path(pid, engine)
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(snapshot))
    os.replace(tmp, path)
    return path


def unpublish(pid: int | None = None, engine: int = 0) -> None:
    entry_path(pid, engine).unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (the server record checks its owner the same way)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def read_all(now: float | None = None) -> list[dict]:
    """Every live engine's snapshot, by pid then engine number; stale files are deleted."""
    now = time.time() if now is None else now
    entries = []
    for path in sorted(run_dir().glob("*.json")):
        try:
            pid, engine = (int(part) for part in path.stem.split("-"))
            snapshot = json.loads(path.read_text())
        except (ValueError, OSError):
            path.unlink(missing_ok=True)  # half-written by a foreign tool or unreadable: drop it
            continue
        fresh = now - float(snapshot.get("updated_at", 0)) <= STALE_AFTER_S
        if not pid_alive(pid) or not fresh:
            path.unlink(missing_ok=True)
            continue
        entries.append({**snapshot, "pid": pid, "engine": engine})
    return sorted(entries, key=lambda s: (s["pid"], s["engine"]))


class PsPublisher:
    """Keeps one engine's run file current while it runs (an asyncio task on its loop)."""

    def __init__(self, engine: Any, interval: float = REFRESH_S) -> None:
        self.engine = engine
        self.interval = interval
        self.number = next(_engine_numbers)  # its file is <pid>-<number>.json
        self._task: asyncio.Task | None = None

    def refresh(self) -> None:
        try:
            publish(engine_snapshot(self.engine), engine=self.number)
        except OSError:
            pass  # a read-only or full data dir must not take the engine down; ps just won't see it

    async def _loop(self) -> None:
        while True:
            self.refresh()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="pie-ps-publisher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        unpublish(engine=self.number)
