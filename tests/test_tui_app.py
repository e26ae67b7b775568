"""The app shell: screens, help, command palette, log panel, error notifications, resize."""

from __future__ import annotations

import logging

from textual.widgets import Input

from pie_local.present.problems import UserError
from pie_local.tui.app import PieApp
from pie_local.tui.backend import Backend, explain
from pie_local.tui.screens.help import HelpScreen
from pie_local.tui.screens.logs import LogsScreen
from pie_local.tui.screens.models import ModelsScreen
from pie_local.tui.screens.monitor import MonitorScreen
from pie_local.tui.screens.sessions import SessionsScreen
from pie_local.tui.sessions_store import SessionSettings, SessionStore
from pie_local.tui.widgets.log_panel import LogPanel
from tui_support import StaticBackend, wait_until


async def test_number_keys_switch_screens():
    app = PieApp(backend=StaticBackend())
    async with app.run_test(size=(80, 24)) as pilot:
        assert isinstance(app.screen, SessionsScreen)  # models are installed
        for key, screen in (("2", ModelsScreen), ("3", MonitorScreen), ("4", LogsScreen), ("1", SessionsScreen)):
            await pilot.press(key)
            assert isinstance(app.screen, screen), key


async def test_opens_on_models_when_nothing_is_installed():
    class Empty(StaticBackend):
        def installed(self):
            return []

    app = PieApp(backend=Empty())
    async with app.run_test(size=(80, 24)):
        assert isinstance(app.screen, ModelsScreen)
    store = SessionStore()
    store.create(SessionSettings("old chat", "gone-model"))
    app = PieApp(backend=Empty(), store=store)
    async with app.run_test(size=(80, 24)):
        assert isinstance(app.screen, SessionsScreen)  # existing sessions win


async def test_help_opens_on_question_mark_and_closes_with_escape():
    app = PieApp(backend=StaticBackend())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("2", "question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, ModelsScreen)


async def test_question_mark_in_the_message_box_is_text_not_help():
    store = SessionStore()
    store.create(SessionSettings("chat", "gemma3-270m"))
    app = PieApp(backend=StaticBackend(), store=store)
    async with app.run_test(size=(80, 24)) as pilot:
        prompt = app.screen.query_one("#prompt", Input)
        prompt.focus()
        await pilot.press("w", "h", "y", "question_mark", "2")
        assert prompt.value == "why?2"
        assert isinstance(app.screen, SessionsScreen)


async def test_command_palette_runs_our_commands():
    app = PieApp(backend=StaticBackend())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+p")
        await pilot.press(*"monitor")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, MonitorScreen), what="monitor screen")


async def test_logs_go_to_the_log_panel_not_stderr(capfd):
    app = PieApp(backend=StaticBackend())
    async with app.run_test(size=(80, 24)) as pilot:
        logging.getLogger("pie_local.driver").warning("ggml: backend CPU selected")
        await pilot.press("4")
        panel = app.screen.query_one(LogPanel)
        await wait_until(pilot, lambda: any("backend CPU selected" in line.text for line in panel.lines),
                         what="log line")
    assert "backend CPU selected" not in capfd.readouterr().err
    assert app.log_buffer not in logging.getLogger().handlers  # removed on exit


async def test_errors_become_notifications_with_the_fix():
    class Broken(StaticBackend):
        def installed(self):
            raise explain(PermissionError("models dir is read-only"))

    app = PieApp(backend=Broken(), start_mode="models")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app._notifications, what="notification")
        (note,) = list(app._notifications)
        assert note.severity == "error"
        assert "models dir is read-only" in note.message
        assert "Fix: choose a location you can write to" in note.message


def test_explain_maps_lower_layer_errors():
    from pie_local.driver.types import DriverError
    from pie_local.models.errors import ModelError
    from pie_local.runtime.inferlet import InferletError
    from pie_local.runtime.limits import PageLimitError
    from pie_local.runtime.pages import OutOfPagesError

    assert str(explain(ModelError("unknown model 'x'; pull it"))) == "unknown model 'x'; pull it"
    out = explain(OutOfPagesError("need 3, have 1"))
    assert out.message == "out of KV cache pages: need 3, have 1" and "max tokens" in out.fix
    assert explain(PageLimitError("limit 4")).message.startswith("out of KV cache pages")
    assert "pie-local doctor" in explain(DriverError("backend", "ggml failed")).fix
    assert "--help" in explain(InferletError("no inferlet named 'x'")).fix
    err = UserError("boom", "do this")
    assert explain(err) is err and str(err) == "boom\nFix: do this"
    assert explain(ValueError("odd")).fix.startswith("see the logs screen")


async def test_survives_resize_from_small_to_wide():
    app = PieApp(backend=StaticBackend())
    async with app.run_test(size=(80, 24)) as pilot:
        for key in ("1", "2", "3", "4"):
            await pilot.press(key)
            await pilot.resize_terminal(200, 60)
            await pilot.pause()
            await pilot.resize_terminal(60, 20)
            await pilot.pause()
            await pilot.resize_terminal(80, 24)
        assert app.screen.size.width == 80
        assert not app._exception


async def test_default_backend_loads_nothing_until_needed():
    calls: list[str] = []
    backend = Backend(engine_factory=lambda model: calls.append(model))
    app = PieApp(backend=backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("3")
        await pilot.pause(0.3)
    assert calls == [] and backend.engine is None


def test_native_stderr_goes_to_a_log_file_while_the_ui_runs(tmp_path):
    import os
    import sys

    from pie_local.cli.tui import native_stderr_to

    log_file = tmp_path / "logs" / "tui-stderr.log"
    before = os.fstat(2)
    original = sys.__stderr__
    with native_stderr_to(log_file):
        os.write(2, b"ggml_backend: noise from C\n")  # what native code does
        assert sys.__stderr__ is not original  # Textual draws on a copy of the terminal descriptor
        assert os.fstat(sys.__stderr__.fileno()).st_ino == before.st_ino
    assert log_file.read_text() == "ggml_backend: noise from C\n"
    assert os.fstat(2).st_ino == before.st_ino and sys.__stderr__ is original


def test_tui_command_needs_a_terminal(capsys):
    from pie_local.cli import main, tui

    assert main(["tui"]) == 1  # an error, not a usage error: the command line is fine
    assert "needs an interactive terminal" in capsys.readouterr().err
    doc = tui.__doc__
    assert doc.splitlines()[0].startswith("Open the terminal UI") and "examples:" in doc


def test_log_buffer_keeps_the_newest_records_and_survives_bad_calls():
    from pie_local.tui.widgets.log_panel import LogBuffer

    buffer = LogBuffer(capacity=3)
    logger = logging.getLogger("pie_local.test_buffer")
    logger.addHandler(buffer)
    logger.propagate = False
    try:
        for i in range(5):
            logger.warning("line %d", i)
        logger.warning("needs two %s %s", "args")  # a broken call from some library
        logger.debug("below INFO: dropped")
    finally:
        logger.removeHandler(buffer)
        logger.propagate = True
    assert buffer.serial == 6
    texts = [text for _, text, _ in buffer.since(0)]
    assert [t.split(": ", 1)[1] for t in texts[:2]] == ["line 3", "line 4"]
    assert "unformattable" in texts[2]
    assert [serial for serial, _, _ in buffer.since(5)] == [6]
