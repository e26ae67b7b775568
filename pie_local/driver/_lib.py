"""Finds and loads libpie_driver once per process, and routes its logs (and llama.cpp's) to
Python logging so nothing reaches the terminal directly.

Search order: $PIE_DRIVER_LIB (an exact file), beside this module, ``pie_local/driver/`` under
each ``sys.path`` entry, then the repository's dev build ``build/native``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from pathlib import Path

from pie_local.driver import _ffi
from pie_local.llama_logs import route_llama_logs

log = logging.getLogger("pie_local.driver")
# A library's logs reach the terminal only through handlers the application installs (the TUI
# owns the screen); without this, Python's last-resort handler would print warnings to stderr.
logging.getLogger("pie_local").addHandler(logging.NullHandler())

_LIB_NAMES = {"darwin": "libpie_driver.dylib", "win32": "pie_driver.dll"}
LIB_NAME = _LIB_NAMES.get(sys.platform, "libpie_driver.so")
_LEVELS = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


class DriverNotFound(RuntimeError):
    pass


def candidates() -> list[Path]:
    """Every place the library is looked for, in order."""
    env = os.environ.get("PIE_DRIVER_LIB")
    if env:
        return [Path(env)]
    here = Path(__file__).resolve().parent
    found = [here / LIB_NAME]
    for entry in sys.path:
        if entry:
            found.append(Path(entry) / "pie_local" / "driver" / LIB_NAME)
    repo = here.parent.parent
    found.append(repo / "build" / "native" / LIB_NAME)
    return found


@_ffi.LOG_CALLBACK
def _on_log(level: int, message: bytes, _user: object) -> None:
    log.log(_LEVELS[level] if 0 <= level < 4 else logging.INFO, "%s", message.decode("utf-8", "replace"))


def load() -> ctypes.CDLL:
    """The bound library (loaded, ABI-checked and log-routed on first call)."""
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        tried = candidates()
        path = next((p for p in tried if p.is_file()), None)
        if path is None:
            where = "\n  ".join(str(p) for p in tried)
            raise DriverNotFound(
                f"{LIB_NAME} not found; looked in:\n  {where}\n"
                "Fix: reinstall with `pip install .` from the source tree, or build it with "
                "`cmake -S native/ggml_driver -B build/native && cmake --build build/native`, "
                "or point PIE_DRIVER_LIB at the file."
            )
        # llama.cpp first: its logger and ours both hook ggml's process-wide logger; ours wins
        # for ggml messages, llama.cpp's own messages keep going through its callback.
        route_llama_logs()
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise DriverNotFound(f"cannot load {path}: {exc}. Fix: reinstall pie-local (pip install .)") from exc
        _ffi.bind(lib, str(path))
        lib.pie_log_set(_on_log, None)
        _lib = lib
        return lib
