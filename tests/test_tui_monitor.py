"""Monitor screen: live engine stats and running inferlets (Engine over FakeDriver)."""

from __future__ import annotations

from textual.widgets import DataTable, Static

from pie_local.tui.app import PieApp
from pie_local.tui.backend import Backend
from pie_local.tui.screens.monitor import MonitorScreen
from tui_support import StaticBackend, fake_engine_factory, wait_until


def stat(app: PieApp, key: str) -> str:
    return str(app.screen.query_one(f"#stat-{key}", Static).render())


async def test_monitor_without_an_engine_says_not_loaded():
    app = PieApp(backend=Backend(engine_factory=fake_engine_factory()), start_mode="monitor")
    async with app.run_test(size=(80, 24)):
        assert isinstance(app.screen, MonitorScreen)
        assert stat(app, "model") == "not loaded"
        assert stat(app, "drafts") == "–"  # no speculation yet
        assert app.screen.query_one("#inferlets", DataTable).row_count == 0


async def test_monitor_shows_running_inferlets_live_and_cancels_them():
    backend = Backend(engine_factory=fake_engine_factory())
    app = PieApp(backend=backend, start_mode="monitor")
    async with app.run_test(size=(80, 24)) as pilot:
        engine = await backend.ensure_engine("toy")

        async def waiter(rt, args):
            ctx = rt.context()
            ctx.fill("a prompt that fills several KV pages of the fake model")
            await ctx.flush()
            await rt.receive()  # blocks until cancelled

        waiter.__name__ = "waiter"
        handle = engine.launch(waiter)
        table = app.screen.query_one("#inferlets", DataTable)
        await wait_until(pilot, lambda: table.row_count == 1 and table.get_row_at(0)[2] == "running"
                         and table.get_row_at(0)[4] != "0", what="running row with pages")
        row = table.get_row_at(0)
        assert row[:3] == [str(handle.id), "waiter", "running"]
        assert int(row[3]) == handle.tokens > 0
        snap = backend.monitor()
        assert stat(app, "model") == "toy"
        used, shared, free = (int(x) for x in stat(app, "pages").split(" (")[0].split(" / "))
        assert used == snap.pages_used > 0 and free == snap.pages_free and shared == snap.pages_shared
        await pilot.press("x")
        await wait_until(pilot, handle.done, what="cancel")
        assert handle.state == "cancelled"
        await wait_until(pilot, lambda: table.get_row_at(0)[2] == "cancelled", what="row update")
        assert "Cancelled inferlet" in list(app._notifications)[-1].message


async def test_cancel_with_nothing_running_warns():
    app = PieApp(backend=Backend(engine_factory=fake_engine_factory()), start_mode="monitor")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("x")
        assert "No inferlet is running" in list(app._notifications)[-1].message


async def test_monitor_formats_the_backend_numbers():
    app = PieApp(backend=StaticBackend(), start_mode="monitor")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.1)
        assert stat(app, "pages") == "40 / 8 / 216 (16%)"
        assert stat(app, "tps") == "57.5"
        assert stat(app, "batch") == "2.0 req · 33 tok"
        assert stat(app, "prefix") == "42%"
        assert stat(app, "drafts") == "78% of 120"
        table = app.screen.query_one("#inferlets", DataTable)
        assert [table.get_row_at(i)[:3] for i in range(table.row_count)] == [
            ["1", "chat", "running"], ["2", "best-of-n", "queued"]]
