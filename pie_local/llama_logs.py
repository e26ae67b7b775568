"""llama.cpp and ggml print to stderr even when asked to be quiet; this sends their lines to Python
logging ("pie_local.llama_cpp") instead, so the TUI owns the terminal and the CLI's output stays clean.

The callback is process-wide (llama_log_set sets ggml's logger too). It is installed once and its
ctypes object kept alive here, since C holds the pointer. `llama_cpp.Llama(verbose=...)` installs its
own stderr logger, so code that builds one calls route_llama_logs() again afterwards.
"""

from __future__ import annotations

import ctypes
import logging
import threading

log = logging.getLogger("pie_local.llama_cpp")
log.addHandler(logging.NullHandler())  # unconfigured logging must not fall back to stderr

# enum ggml_log_level -> logging level; 5 (CONT) continues the previous message at its level.
_GGML_LEVELS = {0: logging.INFO, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_state: dict = {"callback": None, "last_level": logging.DEBUG}
_lock = threading.Lock()


def route_llama_logs() -> None:
    """Installs (or re-installs) the callback; a no-op when llama_cpp is not installed."""
    try:
        import llama_cpp
    except ImportError:  # the driver works without the Python package
        return
    with _lock:
        if _state["callback"] is None:

            @llama_cpp.llama_log_callback
            def _callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
                py_level = _state["last_level"] if level == 5 else _GGML_LEVELS.get(level, logging.DEBUG)
                _state["last_level"] = py_level
                message = text.decode("utf-8", errors="replace").rstrip("\n")
                if message and log.isEnabledFor(py_level):
                    log.log(py_level, "%s", message)

            _state["callback"] = _callback
        llama_cpp.llama_log_set(_state["callback"], ctypes.c_void_p(0))
