"""Open the terminal UI: chat sessions, models, and a live monitor of the engine.

When a pie-local server runs, the TUI attaches to it (its status bar says `server HOST:PORT`):
sessions generate there and the monitor shows every client's runs. Otherwise it loads the model
itself. --local always does; --server URL attaches to that server.

examples:
  pie-local                      # same as `pie-local tui`
  pie-local tui
  pie-local tui --model gemma3-270m --screen sessions
  pie-local tui --local
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

SCREENS = ("sessions", "models", "monitor", "logs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="default model for new sessions (installed name or .gguf path)")
    parser.add_argument("--screen", choices=SCREENS, help="screen to open first (default: sessions, or models "
                        "when no model is installed)")
    from pie_local.cli.target import add_target_arguments

    add_target_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if not sys.stdin.isatty() or not sys.stdout.isatty():
        from pie_local.present.problems import UserError

        raise UserError("the TUI needs an interactive terminal", "for scripts use `pie-local run` or `pie-local chat`")
    from pie_local import paths
    from pie_local.cli.target import server_client
    from pie_local.tui.app import PieApp
    from pie_local.tui.backend import Backend

    backend = Backend(server=server_client(args))
    log_path = paths.home() / "logs" / "tui-stderr.log"
    with native_stderr_to(log_path):
        PieApp(backend=backend, default_model=args.model, start_mode=args.screen).run()
    return 0


@contextlib.contextmanager
def native_stderr_to(path: os.PathLike) -> Iterator[None]:
    """Send file descriptor 2 to a log file while the UI runs.

    Native code (ggml, llama.cpp) may write to stderr before its log callback is installed; those
    bytes would land on top of the screen. Textual draws on ``sys.__stderr__``, so it gets a
    duplicate of the real terminal descriptor instead.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stderr.flush()
    terminal_fd = os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    original = sys.__stderr__
    terminal = os.fdopen(terminal_fd, "w", buffering=1, encoding=getattr(original, "encoding", None) or "utf-8")
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.__stderr__ = sys.stderr = terminal
    try:
        yield
    finally:
        terminal.flush()
        os.dup2(terminal_fd, 2)
        sys.__stderr__ = sys.stderr = original
        terminal.close()
