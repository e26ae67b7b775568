"""Models screen: installed + catalogue, details from the GGUF, pull (fake hub), delete, starter."""

from __future__ import annotations

import threading

from textual.widgets import Button, DataTable, Input, Static

from pie_local.models import store
from pie_local.tui.app import PieApp
from pie_local.tui.backend import Backend
from pie_local.tui.screens.dialogs import ConfirmScreen, PromptScreen
from pie_local.tui.screens.models import ModelsScreen
from tui_support import fake_engine_factory, install_tiny_model, wait_until


def table_rows(app: PieApp, table_id: str) -> list[list]:
    table = app.screen.query_one(f"#{table_id}", DataTable)
    return [table.get_row_at(i) for i in range(table.row_count)]


def details(app: PieApp) -> str:
    return str(app.screen.query_one("#details", Static).render())


def make_app(backend: Backend | None = None) -> PieApp:
    return PieApp(backend=backend or Backend(engine_factory=fake_engine_factory()), start_mode="models")


async def loaded(pilot, app: PieApp) -> None:
    await wait_until(pilot, lambda: table_rows(app, "catalogue"), what="tables")


async def test_no_model_installed_offers_the_starter():
    app = PieApp(backend=Backend(engine_factory=fake_engine_factory()))
    async with app.run_test(size=(80, 24)) as pilot:
        assert isinstance(app.screen, ModelsScreen)  # nothing to chat with: start on Models
        await loaded(pilot, app)
        assert app.screen.query_one("#starter-banner").display
        assert "starter" in str(app.screen.query_one("#starter", Button).label).lower()
        (starter,) = table_rows(app, "installed")
        assert starter[0] == "gemma3-270m" and starter[2] == "press s"
        names = [row[0] for row in table_rows(app, "catalogue")]
        assert "gemma3-270m" in names and len(names) >= 10


async def test_installed_model_details_from_its_gguf(tmp_path):
    install_tiny_model(tmp_path, "tiny-llama")
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot, app)
        assert not app.screen.query_one("#starter-banner").display
        rows = {row[0]: row for row in table_rows(app, "installed")}
        assert rows["tiny-llama"][3] == "llama"
        await wait_until(pilot, lambda: "architecture" in details(app), what="details")
        text = details(app)
        assert "tiny-llama" in text and "llama" in text and "memory @ 4096 tok" in text
        assert "built-in fallback" in text  # the tiny model has no chat template


async def test_catalogue_highlight_shows_its_entry():
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot, app)
        table = app.screen.query_one("#catalogue", DataTable)
        table.focus()
        await pilot.press("down")
        name = table.get_row_at(table.cursor_row)[0]
        await wait_until(pilot, lambda: details(app).startswith(name), what="catalogue details")
        assert "quants:" in details(app)


async def test_catalogue_marks_entries_no_pull_has_confirmed():
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot, app)
        marks = {row[0]: row[3] for row in table_rows(app, "catalogue")}
        assert marks["gemma3-270m"] == "" and marks["gpt-oss-20b"] == "?"  # the starter ships verified
        table = app.screen.query_one("#catalogue", DataTable)
        table.focus()
        table.move_cursor(row=list(marks).index("gpt-oss-20b"))
        await wait_until(pilot, lambda: details(app).startswith("gpt-oss-20b"), what="catalogue details")
        assert "unverified: hub names not yet confirmed by a pull" in details(app)


async def test_delete_asks_first_and_keeps_files_added_in_place(tmp_path):
    path = install_tiny_model(tmp_path, "tiny-llama")
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot, app)
        table = app.screen.query_one("#installed", DataTable)
        table.focus()
        table.move_cursor(row=[r[0] for r in table_rows(app, "installed")].index("tiny-llama"))
        await pilot.press("d")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, ModelsScreen), what="back")
        assert store.get("tiny-llama") is not None
        await pilot.press("d")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        await pilot.press("y")
        await wait_until(pilot, lambda: "tiny-llama" not in [r[0] for r in table_rows(app, "installed")],
                         what="row removed")
    assert store.get("tiny-llama") is None
    assert path.exists()  # added in place: pie-local never deletes it


async def test_pull_by_spec_with_progress_then_cancel_and_resume(monkeypatch, tmp_path):
    from fake_hub import FakeHub, write_gguf

    data = write_gguf(tmp_path / "src.gguf", pad_bytes=6_000_000).read_bytes()
    cancel_at_first_bytes = threading.Event()
    updates = []

    class CancellingBackend(Backend):
        """Cancels the first pull through the screen's cancel action (the `c` key) once bytes arrive."""

        def pull(self, spec, on_progress, cancel):
            def progress(update):
                updates.append(update)
                on_progress(update)
                if update.phase == "downloading" and 0 < update.done_bytes and not cancel_at_first_bytes.is_set():
                    cancel_at_first_bytes.set()
                    app.call_from_thread(app.screen.action_cancel_pull)
                    assert cancel.is_set()

            return super().pull(spec, progress, cancel)

    with FakeHub() as hub:
        hub.add_repo("acme/Tiny-GGUF", {"tiny-Q4_K_M.gguf": data, "README.md": b"hi"})
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        app = make_app(CancellingBackend(engine_factory=fake_engine_factory()))
        # Record every notification: on a loaded machine the first can expire before the second.
        notified: list[str] = []
        show = app.notify
        app.notify = lambda message, *a, **kw: (notified.append(str(message)), show(message, *a, **kw))[1]
        async with app.run_test(size=(80, 24)) as pilot:
            await loaded(pilot, app)
            for attempt in (1, 2):
                await pilot.press("u")
                await wait_until(pilot, lambda: isinstance(app.screen, PromptScreen), what="spec prompt")
                app.screen.query_one("#answer", Input).value = "acme/Tiny-GGUF:Q4_K_M"
                await pilot.press("enter")
                await wait_until(pilot, lambda: app.screen.pulling is None and len(notified) >= attempt,
                                 timeout=60, what=f"pull {attempt}")
            first, second = notified
            assert "cancelled; pull again to resume" in first
            assert second.startswith("Installed ")
            assert any(r[0].startswith("tiny") or "Tiny" in r[0] for r in table_rows(app, "installed"))
            assert not app.screen.query_one("#pull-bar").display
    downloading = [u for u in updates if u.phase == "downloading"]
    assert downloading[-1].done_bytes == downloading[-1].total_bytes == len(data)
    ranges = hub.gets("tiny-Q4_K_M.gguf")
    assert len(ranges) == 2 and ranges[1] not in (None, "bytes=0-")  # the second GET resumed
    assert hub.bytes_served["tiny-Q4_K_M.gguf"] < 2 * len(data)


async def test_pull_errors_are_notifications_with_the_fix(monkeypatch):
    from fake_hub import FakeHub

    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        app = make_app()
        async with app.run_test(size=(80, 24)) as pilot:
            await loaded(pilot, app)
            app.screen.start_pull("nobody/Missing-GGUF:Q4_K_M")
            await wait_until(pilot, lambda: app.screen.pulling is None and app._notifications, timeout=30,
                             what="error")
            note = list(app._notifications)[-1]
            assert note.severity == "error"
            assert "Missing-GGUF" in note.message
