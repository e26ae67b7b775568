"""The help screen (`?`): keys of every screen and what the TUI does."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# pie-local

| key | where | what |
|---|---|---|
| `1` `2` `3` `4` | anywhere | sessions, models, monitor, logs |
| `ctrl+p` | anywhere | command palette |
| `?` | anywhere | this help |
| `ctrl+q` | anywhere | quit |
| `ctrl+n` | sessions | new session |
| `enter` | sessions | send the message |
| `escape` | sessions | cancel the reply being generated |
| `ctrl+r` | sessions | regenerate the last reply |
| `f2` | sessions | rename the session |
| `f3` | sessions | export to Markdown |
| `f8` | sessions | delete the session |
| `p` | models | pull the highlighted catalogue model |
| `u` | models | pull by spec (`NAME:QUANT`, `OWNER/REPO:QUANT`, `OWNER/REPO/FILE.gguf`) |
| `c` | models | cancel the pull (the partial file is kept: pull again to resume) |
| `d` | models | delete the highlighted installed model |
| `s` | models | set up the starter model (no download) |
| `x` | monitor | cancel the highlighted inferlet |

Sessions are stored on disk with their KV cache: reopening a chat continues from the saved KV
instead of reading the whole history again (see the time to first token under the chat).
The model loads the first time a session needs it. Driver and llama.cpp logs go to the logs screen.

When a pie-local server runs (`pie-local serve`), the TUI attaches to it and the status bar says
`server HOST:PORT`: sessions generate on the server's model, which every client shares, and the
monitor shows every client's runs. The server keeps the KV cache then: a session's history is
resumed from its prefix cache instead of a saved snapshot. `pie-local tui --local` never attaches.
"""


class HelpScreen(ModalScreen[None]):
    CSS_PATH = "help.tcss"
    BINDINGS = [("escape,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Markdown(HELP)
