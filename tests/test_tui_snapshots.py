"""Screenshots of the main screens at a fixed size (pytest-textual-snapshot).

The backend is StaticBackend (fixed models and stats) so images do not depend on paths, clocks
or speed. Regenerate after a deliberate UI change with `pytest tests/test_tui_snapshots.py
--snapshot-update`, and look at the SVGs under tests/__snapshots__/ before committing them.
"""

from __future__ import annotations

import pytest

from pie_local.tui.app import PieApp
from pie_local.tui.sessions_store import SessionSettings, SessionStore
from tui_support import StaticBackend, wait_until


def app_with_a_chat(start_mode: str = "sessions") -> PieApp:
    store = SessionStore()
    store.create(SessionSettings("Older chat", "qwen2.5-0.5b"))
    s = store.create(SessionSettings("Trip to Lisbon", "gemma3-270m", system_prompt="Be brief."))
    store.add_message(s.id, "user", "Three things to see in Lisbon?")
    store.add_message(s.id, "assistant", "1. **Belém Tower**\n2. The *Alfama* district\n3. Tram `28`",
                      prefix_tokens=20, ttft_ms=41.0)
    return PieApp(backend=StaticBackend(), store=store, start_mode=start_mode)


@pytest.mark.parametrize("size", [(80, 24), (140, 40)], ids=["80x24", "140x40"])
def test_sessions_screen(snap_compare, size):
    assert snap_compare(app_with_a_chat(), terminal_size=size)


async def _tables_loaded(pilot) -> None:
    await wait_until(pilot, lambda: pilot.app.screen.query_one("#catalogue").row_count > 0, what="tables")
    await pilot.pause()


@pytest.mark.parametrize("size", [(80, 24), (140, 40)], ids=["80x24", "140x40"])
def test_models_screen(snap_compare, size):
    assert snap_compare(app_with_a_chat("models"), terminal_size=size, run_before=_tables_loaded)


def test_monitor_screen(snap_compare, monkeypatch):
    # one refresh only: the tokens/s sparkline grows with every refresh
    monkeypatch.setattr("pie_local.tui.screens.monitor.REFRESH_S", 3600.0)
    assert snap_compare(app_with_a_chat("monitor"), terminal_size=(80, 24))


async def _open_new_session(pilot) -> None:
    from pie_local.tui.screens.new_session import NewSessionScreen

    await pilot.press("ctrl+n")
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, NewSessionScreen)
                     and pilot.app.focused is pilot.app.screen.query_one("#title"), what="dialog")
    pilot.app.focused.cursor_blink = False  # a blinking cursor would make the image random
    await pilot.pause(0.2)


def test_new_session_dialog(snap_compare):
    assert snap_compare(app_with_a_chat(), terminal_size=(80, 24), run_before=_open_new_session)


def test_help_screen(snap_compare):
    assert snap_compare(app_with_a_chat(), terminal_size=(80, 24), press=["question_mark"])
