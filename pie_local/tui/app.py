"""The pie-local TUI: sessions, models, monitor and logs screens over one Backend."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from pie_local.present.problems import UserError
from pie_local.tui.backend import Backend, explain
from pie_local.tui.screens.help import HelpScreen
from pie_local.tui.screens.logs import LogsScreen
from pie_local.tui.screens.models import ModelsScreen
from pie_local.tui.screens.monitor import MonitorScreen
from pie_local.tui.screens.sessions import SessionsScreen
from pie_local.tui.sessions_store import SessionStore
from pie_local.tui.widgets.log_panel import LogBuffer

log = logging.getLogger("pie_local.tui")


class PieApp(App):
    TITLE = "pie-local"
    CSS_PATH = "app.tcss"
    MODES = {"sessions": SessionsScreen, "models": ModelsScreen, "monitor": MonitorScreen, "logs": LogsScreen}
    BINDINGS = [
        Binding("1", "switch_mode('sessions')", "Sessions"),
        Binding("2", "switch_mode('models')", "Models"),
        Binding("3", "switch_mode('monitor')", "Monitor"),
        Binding("4", "switch_mode('logs')", "Logs"),
        Binding("question_mark", "help", "Help"),
    ]

    def __init__(self, backend: Backend | None = None, store: SessionStore | None = None,
                 default_model: str | None = None, start_mode: str | None = None) -> None:
        super().__init__()
        self.backend = backend or Backend()
        self.store = store or SessionStore()
        self.default_model = default_model
        self.start_mode = start_mode
        self.log_buffer = LogBuffer()
        self._root_level = logging.WARNING

    async def on_mount(self) -> None:
        # Everything logged below (driver, llama.cpp, runtime) goes to the logs screen, not stderr.
        root = logging.getLogger()
        self._root_level = root.level
        root.addHandler(self.log_buffer)
        root.setLevel(min(root.level, logging.INFO) if root.level else logging.INFO)
        await self.backend.start()
        # listing the models reads the disk, or asks the server: never on the loop that draws
        self.switch_mode(self.start_mode or await asyncio.to_thread(self._first_mode))

    def _first_mode(self) -> str:
        """Sessions when there is something to chat with, else Models (which offers the starter)."""
        try:
            has_models = any(m.present for m in self.backend.installed())
        except UserError:
            has_models = False
        return "sessions" if has_models or self.store.list() else "models"

    async def action_quit(self) -> None:
        await self.backend.close()
        self.exit()

    async def on_unmount(self) -> None:
        await self.backend.close()
        root = logging.getLogger()
        root.removeHandler(self.log_buffer)
        root.setLevel(self._root_level)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def report_error(self, exc: BaseException) -> None:
        """Show an error from a lower layer as a notification with its fix."""
        error = explain(exc)
        log.warning("%s", error)
        self.notify(str(error), title="Error", severity="error", timeout=12)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Sessions", "Chat sessions (1)", lambda: self.switch_mode("sessions"))
        yield SystemCommand("Models", "Installed models and the catalogue (2)", lambda: self.switch_mode("models"))
        yield SystemCommand("Monitor", "Running inferlets, KV pages, throughput (3)", lambda: self.switch_mode("monitor"))
        yield SystemCommand("Logs", "Driver and runtime logs (4)", lambda: self.switch_mode("logs"))
        yield SystemCommand("New session", "Start a chat session", self._new_session)
        yield SystemCommand("Pull a model", "Download a model by name or hub spec", self._pull)
        yield SystemCommand("Set up the starter model", "Gemma 3 270M, no download", self._starter)
        yield SystemCommand("Help", "Keys and what each screen does (?)", self.action_help)

    async def _new_session(self) -> None:
        await self.switch_mode("sessions")
        self.screen.action_new_session()

    async def _pull(self) -> None:
        await self.switch_mode("models")
        self.screen.action_pull_spec()

    async def _starter(self) -> None:
        await self.switch_mode("models")
        self.screen.action_starter()
