"""Logs: what the driver, llama.cpp and the runtime logged (they never print over the screen)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer, Label

from pie_local.tui.widgets.log_panel import LogPanel
from pie_local.tui.widgets.status_bar import StatusBar


class LogsScreen(Screen):
    CSS_PATH = "logs.tcss"

    def compose(self) -> ComposeResult:
        yield Label("Logs (driver, llama.cpp, runtime)", classes="heading")
        yield LogPanel(self.app.log_buffer, id="log")
        yield StatusBar()
        yield Footer()
