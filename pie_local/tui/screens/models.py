"""Models: installed models beside the models.toml catalogue, details, pull with progress, delete."""

from __future__ import annotations

import threading
import time

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, DataTable, Footer, Label, ProgressBar, Static

from pie_local.present.format import human_size
from pie_local.present.problems import UserError
from pie_local.tui.backend import STARTER_MODEL, CatalogueRow, ModelRow, PullUpdate
from pie_local.tui.screens.dialogs import ConfirmScreen, PromptScreen
from pie_local.tui.widgets.status_bar import StatusBar


class ModelsScreen(Screen):
    CSS_PATH = "models.tcss"
    BINDINGS = [
        Binding("p", "pull_selected", "Pull"),
        Binding("u", "pull_spec", "Pull spec…"),
        Binding("c", "cancel_pull", "Cancel pull"),
        Binding("d", "delete", "Delete"),
        Binding("s", "starter", "Starter model"),
        Binding("r", "refresh", "Refresh", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.cancel_event: threading.Event | None = None
        self.pulling: str | None = None
        self.catalogue: list[CatalogueRow] = []
        self.installed: list[ModelRow] = []

    def compose(self) -> ComposeResult:
        with Vertical(id="starter-banner"):
            yield Label("No model installed yet. The starter model (Gemma 3 270M, 253 MB) ships with "
                        "pie-local and needs no download.")
            yield Button("Set up the starter model", id="starter", variant="primary")
        with Horizontal(id="tables"):
            with Vertical(classes="pane"):
                yield Label("Installed", classes="heading")
                yield DataTable(id="installed", cursor_type="row", zebra_stripes=True)
            with Vertical(classes="pane"):
                yield Label("Catalogue (models.toml)", classes="heading")
                yield DataTable(id="catalogue", cursor_type="row", zebra_stripes=True)
        with Vertical(id="details-pane"):
            yield Label("Details", classes="heading")
            yield Static("Highlight a model to see its details.", id="details", markup=False)
        with Horizontal(id="pull-bar"):
            yield Label("", id="pull-label", markup=False)
            yield ProgressBar(id="pull-progress", show_eta=True)
        yield StatusBar()
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#installed", DataTable).add_columns("name", "quant", "size", "arch")
        self.query_one("#catalogue", DataTable).add_columns("name", "params", "arch", "", "description")
        self.query_one("#pull-bar").display = False
        self.action_refresh()

    # ---- loading the tables (thread worker: reads the disk) ----

    def action_refresh(self) -> None:
        self.load_tables()

    @work(thread=True, exclusive=True, group="models-load", exit_on_error=False)
    def load_tables(self) -> None:
        try:
            installed = self.app.backend.installed()
            catalogue = self.app.backend.catalogue()
        except UserError as exc:
            self.app.call_from_thread(self.app.report_error, exc)
            installed, catalogue = [], []
        self.app.call_from_thread(self._fill, installed, catalogue)

    def _fill(self, installed: list[ModelRow], catalogue: list[CatalogueRow]) -> None:
        self.installed = installed
        table = self.query_one("#installed", DataTable)
        table.clear()
        for m in installed:
            size = human_size(m.size_bytes) if m.present else "press s" if m.name == STARTER_MODEL else "missing"
            table.add_row(m.name, m.quant, size, m.arch, key=m.name)
        self.catalogue = catalogue
        cat = self.query_one("#catalogue", DataTable)
        cat.clear()
        for e in catalogue:
            mark = "✓" if e.installed else "" if e.verified else "?"  # ?: never pulled, names unconfirmed
            cat.add_row(e.name, e.params, e.arch, mark, e.description, key=e.name)
        present = [m for m in installed if m.present]
        self.query_one("#starter-banner").display = not present
        if present:  # highlighting a row shows its details
            table.move_cursor(row=installed.index(present[0]))

    # ---- details (thread worker: parses the GGUF header) ----

    @on(DataTable.RowHighlighted)
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and event.data_table.id == "installed":
            name = str(event.row_key.value)
            if any(m.name == name and not m.present for m in self.installed):
                self._set_details(f"{name} ships with pie-local and is not set up yet: press s (no download).")
            else:
                self.show_details(name)
        elif event.row_key is not None and event.data_table.id == "catalogue":
            self._catalogue_details(str(event.row_key.value))

    @work(thread=True, exclusive=True, group="details", exit_on_error=False)
    def show_details(self, name: str) -> None:
        try:
            text = self.app.backend.details(name).text()
        except UserError as exc:
            text = f"{name}: {exc.message}"
        self.app.call_from_thread(self._set_details, text)

    def _set_details(self, text: str) -> None:
        self.query_one("#details", Static).update(text)

    def _catalogue_details(self, name: str) -> None:
        for row in self.catalogue:
            if row.name == name:
                quants = ", ".join(row.quants) or row.default_quant
                state = "installed" if row.installed else "press p to pull"
                size = f" · {human_size(row.size_bytes)}" if row.size_bytes else ""
                unverified = "" if row.verified else " · unverified: hub names not yet confirmed by a pull"
                self._set_details(f"{row.name} ({row.params} {row.arch}) · quants: {quants}{size} · {state}"
                                  f"{unverified}\n{row.description}")

    # ---- pull ----

    def action_pull_selected(self) -> None:
        table = self.query_one("#catalogue", DataTable)
        if table.row_count == 0:
            return
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        self.start_pull(str(key.value))

    def action_pull_spec(self) -> None:
        def got(spec: str | None) -> None:
            if spec:
                self.start_pull(spec)

        self.app.push_screen(PromptScreen("Pull a model: NAME[:QUANT], OWNER/REPO:QUANT or OWNER/REPO/FILE.gguf",
                                          placeholder="qwen2.5-0.5b:Q4_K_M", ok_label="Pull"), got)

    def start_pull(self, spec: str) -> None:
        if self.pulling is not None:
            self.app.notify(f"Already pulling {self.pulling} (c cancels it).", severity="warning")
            return
        self.pulling = spec
        self.cancel_event = threading.Event()
        self.query_one("#pull-bar").display = True
        self.query_one("#pull-label", Label).update(f"pulling {spec}")
        self.query_one("#pull-progress", ProgressBar).update(total=None, progress=0)
        self.pull(spec, self.cancel_event)

    @work(thread=True, exclusive=True, group="pull", exit_on_error=False)
    def pull(self, spec: str, cancel: threading.Event) -> None:
        last = [0.0]

        def progress(update: PullUpdate) -> None:
            now = time.monotonic()
            if now - last[0] >= 0.1 or update.done_bytes == update.total_bytes:  # at most 10 UI updates/s
                last[0] = now
                self.app.call_from_thread(self._on_progress, update)

        try:
            model = self.app.backend.pull(spec, progress, cancel)
        except UserError as exc:
            if cancel.is_set():
                self.app.call_from_thread(self._pull_done, f"Pull of {spec} cancelled; pull again to resume.", None)
            else:
                self.app.call_from_thread(self._pull_done, None, exc)
        else:
            self.app.call_from_thread(self._pull_done, f"Installed {model.name} ({human_size(model.size_bytes)}).", None)

    def _on_progress(self, update: PullUpdate) -> None:
        bar = self.query_one("#pull-progress", ProgressBar)
        bar.update(total=update.total_bytes, progress=update.done_bytes)
        label = self.query_one("#pull-label", Label)
        if update.phase != "downloading":
            label.update(f"{update.spec}: {update.phase}…")
            return
        total = human_size(update.total_bytes) if update.total_bytes else "?"
        label.update(f"{update.spec}: {human_size(update.done_bytes)} / {total} · {human_size(update.speed_bps)}/s")

    def _pull_done(self, message: str | None, error: UserError | None) -> None:
        self.pulling = None
        self.cancel_event = None
        self.query_one("#pull-bar").display = False
        if error is not None:
            self.app.report_error(error)
        elif message:
            self.app.notify(message)
        self.load_tables()

    def action_cancel_pull(self) -> None:
        if self.cancel_event is not None:
            self.cancel_event.set()
            self.query_one("#pull-label", Label).update(f"cancelling {self.pulling}…")

    # ---- starter / delete ----

    @on(Button.Pressed, "#starter")
    def _starter_pressed(self) -> None:
        self.action_starter()

    def action_starter(self) -> None:
        self.query_one("#details", Static).update(f"Setting up {STARTER_MODEL}…")
        self.install_starter()

    @work(thread=True, exclusive=True, group="pull", exit_on_error=False)
    def install_starter(self) -> None:
        try:
            model = self.app.backend.install_starter()
        except UserError as exc:
            self.app.call_from_thread(self._pull_done, None, exc)
        else:
            self.app.call_from_thread(self._pull_done, f"{model.name} is ready.", None)

    def action_delete(self) -> None:
        table = self.query_one("#installed", DataTable)
        if table.row_count == 0:
            self.app.notify("No installed model to delete.", severity="warning")
            return
        name = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.remove_model(name)

        self.app.push_screen(ConfirmScreen(f"Delete model {name}? Files pie-local downloaded are removed; "
                                           "files added in place are kept."), confirmed)

    @work(thread=True, group="models-remove", exit_on_error=False)
    def remove_model(self, name: str) -> None:
        try:
            self.app.backend.remove(name)
        except UserError as exc:
            self.app.call_from_thread(self.app.report_error, exc)
            return
        self.app.call_from_thread(self.app.notify, f"Deleted {name}.")
        self.app.call_from_thread(self.load_tables)

