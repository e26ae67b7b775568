"""The status line at the bottom of every screen: the server it is attached to (if any), loaded
model, memory, tokens/s, inferlets."""

from __future__ import annotations

from textual.widgets import Static

from pie_local.present.format import human_size


class StatusBar(Static):
    """Polls the app's backend once a second; cheap (reads counters only)."""

    DEFAULT_CSS = """
    StatusBar {
        height: 1;
        background: $panel;
        color: $text-muted;
        padding: 0 1;
    }
    """

    def on_mount(self) -> None:
        self.refresh_status()
        self.set_interval(1.0, self.refresh_status)

    def refresh_status(self) -> None:
        backend = getattr(self.app, "backend", None)
        if backend is None:
            return
        snap = backend.monitor()
        where = f"server {snap.server} · " if snap.server else ""
        if snap.model is None:
            self.update(f"{where}no model loaded · it loads when a session needs it")
            return
        running = sum(1 for r in snap.inferlets if r.state == "running")
        self.update(
            f"{where}model {snap.model} · mem {human_size(snap.memory_bytes)} · "
            f"{snap.tokens_per_s:.1f} tok/s · {running} running"
        )
