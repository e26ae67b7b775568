"""Monitor: running inferlets and the engine's KV pages, throughput and prefix hits, live (attached
to a server: every client's runs and the server's numbers)."""

from __future__ import annotations

from collections import deque

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Label, Sparkline, Static

from pie_local.present.problems import UserError
from pie_local.tui.backend import MonitorSnapshot
from pie_local.tui.widgets.status_bar import StatusBar

REFRESH_S = 0.5


class MonitorScreen(Screen):
    CSS_PATH = "monitor.tcss"
    BINDINGS = [Binding("x", "cancel_inferlet", "Cancel inferlet")]

    def __init__(self) -> None:
        super().__init__()
        self.history: deque[float] = deque(maxlen=60)  # tokens/s, last 30 s

    def compose(self) -> ComposeResult:
        with Grid(id="numbers"):
            for key, label in (("model", "model"), ("pages", "pages used/shared/free"),
                               ("tps", "tokens/s"), ("batch", "batch size"), ("prefix", "prefix-hit rate"),
                               ("drafts", "drafts accepted")):
                with Vertical(classes="stat"):
                    yield Label(label, classes="label")
                    yield Static("–", id=f"stat-{key}", classes="value", markup=False)
            with Vertical(classes="stat"):
                yield Label("tokens/s, last 30 s", classes="label")
                yield Sparkline(list(self.history), id="tps-history")
        yield Label("Inferlets", classes="heading")
        yield DataTable(id="inferlets", cursor_type="row", zebra_stripes=True)
        yield StatusBar()
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#inferlets", DataTable).add_columns("id", "name", "state", "tokens", "pages", "elapsed")
        self.refresh_stats()
        self.set_interval(REFRESH_S, self.refresh_stats)

    def refresh_stats(self) -> None:
        self.show(self.app.backend.monitor())

    def show(self, snap: MonitorSnapshot) -> None:
        total = snap.pages_used + snap.pages_free
        values = {
            "model": snap.model or "not loaded",
            "pages": f"{snap.pages_used} / {snap.pages_shared} / {snap.pages_free}"
                     + (f" ({100 * snap.pages_used / total:.0f}%)" if total else ""),
            "tps": f"{snap.tokens_per_s:.1f}",
            "batch": f"{snap.batch_requests:.1f} req · {snap.batch_tokens:.0f} tok",
            "prefix": f"{100 * snap.prefix_hit_rate:.0f}%",
            "drafts": (f"{100 * snap.accepted_tokens / snap.drafted_tokens:.0f}% of {snap.drafted_tokens}"
                       if snap.drafted_tokens else "–"),
        }
        for key, value in values.items():
            self.query_one(f"#stat-{key}", Static).update(value)
        self.history.append(snap.tokens_per_s)
        self.query_one("#tps-history", Sparkline).data = list(self.history)
        table = self.query_one("#inferlets", DataTable)
        selected = self._selected_id()
        table.clear()
        for r in snap.inferlets:
            table.add_row(r.id, r.name, r.state, str(r.tokens), str(r.pages), f"{r.elapsed_s:.1f}s", key=r.id)
        if selected is not None and selected in {r.id for r in snap.inferlets}:
            table.move_cursor(row=table.get_row_index(selected))

    def _selected_id(self) -> str | None:
        table = self.query_one("#inferlets", DataTable)
        if table.row_count == 0:
            return None
        return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    async def action_cancel_inferlet(self) -> None:
        inferlet_id = self._selected_id()
        if inferlet_id is None:
            self.app.notify("No inferlet is running.", severity="warning")
            return
        try:
            cancelled = await self.app.backend.cancel_inferlet(inferlet_id)
        except UserError as exc:
            self.app.report_error(exc)
            return
        if cancelled:
            self.app.notify(f"Cancelled inferlet {inferlet_id}.")
        else:
            self.app.notify(f"Inferlet {inferlet_id} has already finished.", severity="warning")
