"""`pie-local serve` on FakeDriver engines, for tests of its clients (CLI, TUI) in other processes.

    python tests/fake_serve.py [--delay SECONDS] [serve options...]

The real command (its record in the data directory, its errors, its shutdown) with one model,
"fake" (also the default): a toy model that answers each chat turn "You said USER." and otherwise
says "a" until max_tokens or the end of its 4096-token context. ``--delay`` slows every forward
pass, so a long run stays running while a test looks at it.
"""

from __future__ import annotations

import sys

from server_helpers import fake_engine, never_ends
from tui_support import scripted_chat

MODEL = "fake"


def echo_rule():
    """Chat turns get "You said USER."; anything else is "a" forever."""
    chat = scripted_chat(lambda user: f"You said {user}.")
    return lambda visible: chat(visible) if chat(visible) is not None else never_ends(visible)


def resolve(name: str) -> str:
    from pie_local.models import UnknownModelError

    if name not in (MODEL, "default"):
        raise UnknownModelError(name, [MODEL])
    return MODEL


def main(argv: list[str]) -> int:
    from pie_local.cli import main as cli_main
    from pie_local.server import manager

    delay = 0.0
    if argv[:1] == ["--delay"]:
        delay, argv = float(argv[1]), argv[2:]
    rule = echo_rule()
    manager._default_resolve = resolve
    manager.ModelManager._real_engine = lambda self, name: fake_engine(n_pages=4096, delay=delay, next_token=rule)
    return cli_main(["serve", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
