"""The TUI attached to a running server (in-process, on FakeDriver engines): the status bar says
so, sessions generate there, the monitor shows every client's runs and cancels them, and a TUI
and a script share one model."""

from __future__ import annotations

import asyncio
import contextlib

from fake_serve import echo_rule, resolve
from server_helpers import fake_engine, never_ends, serving
from test_tui_sessions import info_text, new_session, send, turn_over
from textual.widgets import DataTable, Static
from tui_support import wait_until

from pie_local.server import Client
from pie_local.server.config import ServerConfig
from pie_local.server.manager import ModelManager
from pie_local.tui.app import PieApp
from pie_local.tui.backend import Backend
from pie_local.tui.screens.monitor import MonitorScreen
from pie_local.tui.sessions_store import SessionStore
from pie_local.tui.widgets.status_bar import StatusBar

MODEL = "fake"


@contextlib.asynccontextmanager
async def fake_server(next_token=None, delay: float = 0.0):
    """A server on this loop whose model "fake" answers chat turns "You said USER."; yields
    (its URL, the engines it created)."""
    engines = []

    def make_engine(name):
        engines.append(fake_engine(n_pages=1024, delay=delay, next_token=next_token or echo_rule()))
        return engines[-1]

    config = ServerConfig()
    async with serving(config, ModelManager(config, resolve=resolve, make_engine=make_engine)) as url:
        yield url, engines


def attached_app(url: str, store: SessionStore | None = None, **kw) -> PieApp:
    return PieApp(backend=Backend(server=Client(url)), store=store or SessionStore(), **kw)


def status(app: PieApp) -> str:
    return str(app.screen.query_one(StatusBar).render())


def stat(app: PieApp, key: str) -> str:
    return str(app.screen.query_one(f"#stat-{key}", Static).render())


async def stats(url: str) -> dict:
    async with Client(url) as client:
        return await client.stats()


async def test_the_status_bar_says_attached_and_the_models_are_the_servers():
    async with fake_server() as (url, engines):
        app = attached_app(url)
        async with app.run_test(size=(100, 24)) as pilot:
            address = url.removeprefix("http://")
            await wait_until(pilot, lambda: f"server {address} · no model loaded" in status(app), what="status")
            async with Client(url) as client:
                served = sorted(m["id"] for m in await client.models())
            rows = await asyncio.to_thread(app.backend.installed)
            assert [r.name for r in rows] == served and all(r.present for r in rows)
        assert engines == []  # nothing loaded until a session needs it


async def test_a_session_generates_on_the_server_and_resumes_from_its_prefix_cache():
    store = SessionStore()
    sid = new_session(store, model=MODEL, system_prompt="Be brief.")
    async with fake_server() as (url, engines):
        app = attached_app(url, store)
        async with app.run_test(size=(100, 24)) as pilot:
            await send(pilot, app, "hello")
            first = info_text(app)
            await wait_until(pilot, lambda: f"model {MODEL}" in status(app), what="model in the status bar")
            await send(pilot, app, "again")
            second = info_text(app)
            await pilot.press("ctrl+r")  # the same prompt again: all of it but a partial page is cached
            await wait_until(pilot, lambda: "waiting" not in info_text(app), what="regenerate started")
            await wait_until(pilot, lambda: turn_over(app), what="regenerated")
            third = info_text(app)
            assert app.backend.engine is None  # nothing loaded in the TUI's process
        assert not app._notifications, [n.message for n in app._notifications]
        assert len(engines) == 1 and [m["name"] for m in (await stats(url))["models"]] == [MODEL]
    session = store.get(sid)
    assert [(m.role, m.content) for m in session.messages] == [
        ("user", "hello"), ("assistant", "You said hello."), ("user", "again"), ("assistant", "You said again.")]
    assert session.snapshot is None  # the server's engine owns the KV
    assert "TTFT" in first and "prefilled" in first and "resumed" not in first
    reused = int(second.split("resumed ")[1].split(" ")[0])  # the first turn's pages, from the server's cache
    assert reused >= session.messages[1].prefix_tokens - 3  # all but a partial page (4 tokens a page)
    assert int(third.split("resumed ")[1].split(" ")[0]) >= session.messages[3].prefix_tokens - 3


async def test_escape_cancels_a_reply_on_the_server_and_frees_its_pages():
    store = SessionStore()
    new_session(store, model=MODEL, max_tokens=2000)
    async with fake_server(next_token=never_ends, delay=0.01) as (url, _):
        app = attached_app(url, store)
        async with app.run_test(size=(100, 24)) as pilot:
            app.screen.query_one("#prompt").value = "talk forever"
            app.screen.query_one("#prompt").focus()
            await pilot.press("enter")
            await wait_until(pilot, lambda: "generating" in info_text(app), what="generating")
            await wait_until(pilot, lambda: (app.screen.turn is not None and app.screen.turn.stats.generated > 3),
                             what="some pieces")
            await pilot.press("escape")
            await wait_until(pilot, lambda: turn_over(app), what="cancelled")
            assert "cancelled" in info_text(app)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while (await stats(url))["models"][0]["stats"]["pages_used"] > 0:  # the server cancelled it
                assert loop.time() < deadline, "the server kept generating"
                await pilot.pause(0.05)
    (session,) = store.list()
    assert store.get(session.id).messages[-1].content.startswith("aaa")  # the part that arrived is kept


async def test_the_monitor_shows_another_clients_run_and_cancels_it():
    async with fake_server(next_token=never_ends, delay=0.01) as (url, _):
        async with Client(url) as script:
            run = await script.launch("text-completion", {"prompt": "go", "max_tokens": 3000}, MODEL)
            app = attached_app(url, start_mode="monitor")
            async with app.run_test(size=(100, 24)) as pilot:
                assert isinstance(app.screen, MonitorScreen)
                table = app.screen.query_one("#inferlets", DataTable)
                await wait_until(pilot, lambda: table.row_count == 1 and int(table.get_row_at(0)[4]) > 0,
                                 what="the script's run with pages")
                assert table.get_row_at(0)[:3] == [run.id, "text-completion", "running"]
                assert stat(app, "model") == MODEL
                used = int(stat(app, "pages").split(" / ")[0])
                assert used > 0
                await pilot.press("x")
                await wait_until(pilot, lambda: table.get_row_at(0)[2] == "cancelled", what="row cancelled")
                assert f"Cancelled inferlet {run.id}" in list(app._notifications)[-1].message
                assert (await run.refresh()).state == "cancelled"
                await pilot.press("x")
                await wait_until(pilot, lambda: "already finished" in list(app._notifications)[-1].message,
                                 what="second cancel refused")


async def test_a_tui_and_a_script_generate_at_once_on_one_model():
    store = SessionStore()
    new_session(store, model=MODEL)
    async with fake_server(delay=0.02) as (url, engines):
        async with Client(url) as script:
            app = attached_app(url, store)
            async with app.run_test(size=(100, 24)) as pilot:
                chunks = script.stream("text-completion", {"prompt": "go", "max_tokens": 400}, MODEL)
                first = await anext(chunks)  # the script is generating
                await send(pilot, app, "hello", timeout=30)
                text = first + "".join([piece async for piece in chunks])
                await app.switch_mode("monitor")  # (the message box has the focus: "3" would be text)
                table = app.screen.query_one("#inferlets", DataTable)
                await wait_until(pilot, lambda: table.row_count == 1 and table.get_row_at(0)[2] == "done",
                                 what="the script's finished run in the monitor")
                assert table.get_row_at(0)[1] == "text-completion"
        assert text == "a" * 400
        (model,) = (await stats(url))["models"]  # one model served both
        assert len(engines) == 1 and model["name"] == MODEL
        assert model["stats"]["max_batch_requests"] == 2  # they generated in the same forward passes
    (session,) = store.list()
    assert store.get(session.id).messages[-1].content == "You said hello."


def test_the_tui_command_attaches_when_a_server_runs_and_embeds_an_engine_otherwise(monkeypatch, tmp_path):
    from server_helpers import serve_process

    from pie_local.cli import main, tui

    backends: list[Backend] = []
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    monkeypatch.setattr(tui, "native_stderr_to", lambda path: contextlib.nullcontext())
    monkeypatch.setattr(PieApp, "run", lambda app: backends.append(app.backend))
    assert main(["tui"]) == 0
    with serve_process(tmp_path, fake_delay=0.0) as (record, _):
        monkeypatch.setenv("PIE_LOCAL_HOME", str(tmp_path))
        assert main(["tui"]) == 0
        assert main(["tui", "--local"]) == 0
    assert main(["tui", "--server", "http://127.0.0.1:9"]) == 0  # named: attached, whether it answers or not
    none, found, local, named = backends
    assert none.server is None and local.server is None  # no server runs / --local: an engine of its own
    assert found.server.address == f"127.0.0.1:{record.port}" and named.server.address == "127.0.0.1:9"


async def test_a_server_that_does_not_answer_is_said_and_a_message_to_it_is_an_error():
    store = SessionStore()
    new_session(store, model=MODEL)
    app = attached_app("http://127.0.0.1:9", store, start_mode="sessions")  # nothing listens on port 9
    async with app.run_test(size=(100, 24)) as pilot:
        assert "server 127.0.0.1:9 (not answering) · no model loaded" in status(app)
        await send(pilot, app, "hello")
        (note,) = list(app._notifications)
        assert "cannot reach the pie-local server at http://127.0.0.1:9" in note.message
        assert "pie-local serve" in note.message  # the fix
    assert [m.role for m in store.get(store.list()[0].id).messages] == ["user"]
