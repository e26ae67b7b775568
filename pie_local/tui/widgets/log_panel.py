"""Logs of the layers below (driver, llama.cpp, runtime) kept in memory and shown in a panel.

``LogBuffer`` is a ``logging.Handler`` installed on the root logger while the app runs, so nothing
is printed over the screen; ``LogPanel`` shows the buffered records and follows new ones.
"""

from __future__ import annotations

import logging
from collections import deque

from rich.text import Text
from textual.widgets import RichLog


class LogBuffer(logging.Handler):
    """Thread-safe ring buffer of formatted records; ``serial`` counts every record ever added."""

    def __init__(self, capacity: int = 2000) -> None:
        super().__init__(level=logging.INFO)
        self.records: deque[tuple[int, str, int]] = deque(maxlen=capacity)  # (serial, text, levelno)
        self.serial = 0
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        # logging.Handler.handle() holds self.lock around emit()
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a bad log call must not break the app
            text = f"{record.name}: {record.msg!r} (unformattable arguments)"
        self.serial += 1
        self.records.append((self.serial, text, record.levelno))

    def since(self, serial: int) -> list[tuple[int, str, int]]:
        """Records newer than ``serial``; safe to call from the UI thread while others log."""
        with self.lock:
            return [r for r in self.records if r[0] > serial]


class LogPanel(RichLog):
    """Shows a LogBuffer; polls it (records may come from any thread)."""

    def __init__(self, buffer: LogBuffer, **kwargs) -> None:
        super().__init__(wrap=True, highlight=False, markup=False, max_lines=2000, **kwargs)
        self.buffer = buffer
        self._seen = 0

    def on_mount(self) -> None:
        self.pull()
        self.set_interval(0.5, self.pull)

    def pull(self) -> None:
        for serial, text, level in self.buffer.since(self._seen):
            style = "red" if level >= logging.ERROR else "yellow" if level >= logging.WARNING else ""
            self.write(Text(text, style=style))
            self._seen = serial
