"""Sessions screen and its dialogs, on an Engine over FakeDriver (scripted replies)."""

from __future__ import annotations

from pathlib import Path

from textual.widgets import Input, Label, ListView, Select, Static

from pie_local.runtime.snapshots import snapshot_path
from pie_local.tui.app import PieApp
from pie_local.tui.backend import Backend
from pie_local.tui.screens.dialogs import ConfirmScreen, PromptScreen
from pie_local.tui.screens.new_session import NewSessionScreen
from pie_local.tui.sessions_store import SessionSettings, SessionStore
from pie_local.tui.widgets.chat_view import AssistantMessage, UserMessage
from tui_support import StaticBackend, fake_engine_factory, wait_until

MODEL = "gemma3-270m"


class ChatBackend(Backend):
    """Real Backend (engine, chat turns, snapshots) with a fixed model list."""

    installed = StaticBackend.installed
    catalogue = StaticBackend.catalogue


def make_app(store: SessionStore | None = None, **factory_kwargs) -> tuple[PieApp, ChatBackend, list[str]]:
    calls: list[str] = []
    backend = ChatBackend(engine_factory=fake_engine_factory(calls, **factory_kwargs))
    return PieApp(backend=backend, store=store or SessionStore()), backend, calls


def new_session(store: SessionStore, **kw) -> int:
    return store.create(SessionSettings(kw.pop("title", "chat"), kw.pop("model", MODEL), **kw)).id


def info_text(app: PieApp) -> str:
    return str(app.screen.query_one("#turn-info", Static).render())


def turn_over(app: PieApp) -> bool:
    busy = ("waiting", "loading", "generating")
    return not app.screen.busy and not any(word in info_text(app) for word in busy)


async def send(pilot, app: PieApp, text: str, timeout: float = 10.0) -> None:
    """Type a message, send it, and wait until its reply (or error) is over."""
    sid = app.screen.session_id
    before = len(app.store.get(sid).messages)
    prompt = app.screen.query_one("#prompt", Input)
    prompt.focus()
    prompt.value = text
    await pilot.press("enter")
    await wait_until(pilot, lambda: len(app.store.get(sid).messages) > before, what="message stored")
    await wait_until(pilot, lambda: turn_over(app), timeout=timeout, what="reply")


# ---- new session dialog -------------------------------------------------------------------------


async def test_new_session_dialog_validates_then_creates():
    app, _, _ = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+n")
        await wait_until(pilot, lambda: isinstance(app.screen, NewSessionScreen), what="dialog")
        dialog = app.screen
        assert dialog.query_one("#model", Select).value == MODEL
        assert dialog.query_one("#inferlet", Select).value == "chat"
        dialog.query_one("#temperature", Input).value = "hot"
        await pilot.press("ctrl+s")
        assert app.screen is dialog
        assert "temperature must be a number" in str(dialog.query_one("#error", Label).render())
        dialog.query_one("#temperature", Input).value = "0.3"
        dialog.query_one("#title", Input).value = "Poems"
        dialog.query_one("#max_tokens", Input).value = "99"
        dialog.query_one("#system_prompt").text = "You write haiku."
        await pilot.click("#create")
        await wait_until(pilot, lambda: not isinstance(app.screen, NewSessionScreen), what="dialog closed")
        (session,) = app.store.list()
        assert session.settings == SessionSettings("Poems", MODEL, "chat", "You write haiku.", 0.3, 0.95, 99)
        assert app.screen.session_id == session.id
        assert "Poems · gemma3-270m · chat" in str(app.screen.query_one("#chat-title", Label).render())


async def test_new_session_dialog_cancel_creates_nothing():
    app, _, _ = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+n")
        await wait_until(pilot, lambda: isinstance(app.screen, NewSessionScreen), what="dialog")
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, NewSessionScreen), what="dialog closed")
        assert app.store.list() == []


async def test_new_session_without_any_model_points_to_the_models_screen():
    class NoModels(ChatBackend):
        def installed(self):
            return []

    store = SessionStore()
    new_session(store)
    app = PieApp(backend=NoModels(), store=store)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+n")
        await wait_until(pilot, lambda: app._notifications, what="notification")
        assert "starter model" in list(app._notifications)[0].message
        assert not isinstance(app.screen, NewSessionScreen)


# ---- chatting -----------------------------------------------------------------------------------


async def test_reply_streams_as_markdown_and_is_stored_with_its_snapshot():
    store = SessionStore()
    sid = new_session(store, system_prompt="Be brief.")
    app, backend, calls = make_app(store)
    async with app.run_test(size=(80, 24)) as pilot:
        assert calls == [] and backend.engine is None  # nothing loads before it is needed
        await send(pilot, app, "hello")
        assert calls == [MODEL]
        reply = app.screen.query(AssistantMessage).last()
        assert reply.source == "You said **hello**."
        assert [w.render().plain for w in app.screen.query(UserMessage)] == ["hello"]
        assert "TTFT" in info_text(app) and "prefilled" in info_text(app)
    session = store.get(sid)
    assert [(m.role, m.content) for m in session.messages] == [("user", "hello"), ("assistant", "You said **hello**.")]
    assert session.messages[1].ttft_ms is not None and session.messages[1].prefix_tokens > 0
    assert (session.snapshot, session.snapshot_model, session.snapshot_upto) == (f"tui-session-{sid}", MODEL, 2)
    assert snapshot_path(session.snapshot).exists()


async def test_resuming_a_session_reopens_its_kv_instead_of_prefilling():
    store = SessionStore()
    sid = new_session(store, system_prompt="You are a patient assistant who answers questions. " * 4)
    app, _, _ = make_app(store)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, app, "first question")
    history_tokens = store.get(sid).messages[1].prefix_tokens + len("You said **first question**.")

    # A restart: new app, new engine (empty prefix cache). The second turn reuses the saved KV.
    app, backend, _ = make_app(store)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, app, "second")
        resumed_info = info_text(app)
        resumed_driver_tokens = backend.engine.driver.stats.tokens
    assert "resumed" in resumed_info
    reused = int(resumed_info.split("resumed ")[1].split(" ")[0])
    assert reused >= history_tokens

    # The same history without its snapshot is prefilled again: many more driver tokens.
    store.set_snapshot(sid, None, None, 0)
    store.delete_message(store.get(sid).messages[-1].id)
    app, backend, _ = make_app(store)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, app, "second")
        prefilled_driver_tokens = backend.engine.driver.stats.tokens
        assert "prefilled" in info_text(app)
    assert prefilled_driver_tokens - resumed_driver_tokens >= reused - 1  # the whole history, once more
    assert store.get(sid).messages[-1].content == "You said **second**."


async def test_escape_cancels_the_reply_and_keeps_the_partial_text():
    store = SessionStore()
    sid = new_session(store)
    long_reply = "word " * 200
    app, _, _ = make_app(store, reply=lambda user: long_reply, delay=0.01)
    async with app.run_test(size=(80, 24)) as pilot:
        prompt = app.screen.query_one("#prompt", Input)
        prompt.focus()
        prompt.value = "talk a lot"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen.turn is not None and app.screen.turn.stats.generated > 5,
                         what="streaming")
        prompt.value = "interrupting"
        await pilot.press("enter")  # refused while a reply streams
        assert "still being generated" in list(app._notifications)[-1].message
        assert [m.content for m in store.get(sid).messages] == ["talk a lot"]
        await pilot.press("escape")
        await wait_until(pilot, lambda: not app.screen.busy, what="cancelled")
        assert "cancelled" in info_text(app)
    session = store.get(sid)
    partial = session.messages[-1].content
    assert session.messages[-1].role == "assistant"
    assert 0 < len(partial) < len(long_reply) and long_reply.startswith(partial)
    assert session.snapshot is None  # a cancelled turn does not save KV


async def test_regenerate_replaces_the_last_reply_reusing_the_kv():
    store = SessionStore()
    sid = new_session(store)
    answer = {"text": "first answer"}
    app, _, _ = make_app(store, reply=lambda user: answer["text"])
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, app, "question")
        answer["text"] = "second answer"
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: "waiting" not in info_text(app), what="regenerate started")
        await wait_until(pilot, lambda: turn_over(app), what="regenerated")
        assert app.screen.query(AssistantMessage).last().source == "second answer"
        assert len(app.screen.query(AssistantMessage)) == 1
        assert "resumed" in info_text(app)
    assert [(m.role, m.content) for m in store.get(sid).messages] == [("user", "question"), ("assistant", "second answer")]


async def test_other_inferlets_get_the_prompt_and_stream_what_they_emit(tmp_path):
    echo = tmp_path / "echo.py"
    echo.write_text(
        'from pie_local.runtime.inferlet import Param\n'
        'NAME = "echo"\nDESCRIPTION = "repeats the prompt"\n'
        'PARAMETERS = {"prompt": Param(str, required=True, help="text")}\n'
        'async def main(rt, args):\n'
        '    for word in ("echo:", args.prompt):\n'
        '        rt.emit(word + " ")\n'
        '    return "done"\n'
    )
    store = SessionStore()
    sid = new_session(store, inferlet=str(echo))
    app, _, _ = make_app(store)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, app, "ping")
    assert store.get(sid).messages[-1].content == "echo: ping "


async def test_engine_errors_are_notifications_and_the_message_stays():
    from pie_local.models.errors import ModelError

    def broken(model):
        raise ModelError(f"unknown model '{model}'. Pull it with `pie-local pull {model}`.")

    store = SessionStore()
    sid = new_session(store)
    app = PieApp(backend=ChatBackend(engine_factory=broken), store=store)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, app, "hello?")
        await wait_until(pilot, lambda: app._notifications, what="notification")
        note = list(app._notifications)[0]
        assert note.severity == "error" and "pie-local pull gemma3-270m" in note.message
        assert "no reply" in info_text(app)
        assert len(app.screen.query(AssistantMessage)) == 0
    assert [m.content for m in store.get(sid).messages] == ["hello?"]


# ---- rename / delete / export -------------------------------------------------------------------


async def test_rename_session():
    store = SessionStore()
    sid = new_session(store, title="old name")
    app, _, _ = make_app(store)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f2")
        await wait_until(pilot, lambda: isinstance(app.screen, PromptScreen), what="prompt")
        answer = app.screen.query_one("#answer", Input)
        assert answer.value == "old name"
        answer.value = "new name"
        await pilot.press("enter")
        await wait_until(pilot, lambda: store.get(sid).title == "new name", what="renamed")
        await pilot.pause(0.2)
        item = app.screen.query_one("#session-list", ListView).children[0]
        assert "new name" in str(item.query(Label).first().render())


async def test_delete_session_after_confirmation_removes_its_snapshot():
    store = SessionStore()
    keep = new_session(store, title="keep")
    sid = new_session(store, title="doomed")
    app, _, _ = make_app(store)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, app, "hi")  # the newest session is open: "doomed"
        snap = snapshot_path(store.get(sid).snapshot)
        assert snap.exists()
        await pilot.press("f8")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        await pilot.press("n")  # no: nothing happens
        await wait_until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), what="closed")
        assert [s.id for s in store.list()] == [sid, keep]
        await pilot.press("f8")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        await pilot.press("y")
        await wait_until(pilot, lambda: [s.id for s in store.list()] == [keep], what="deleted")
        await wait_until(pilot, lambda: app.screen.session_id == keep, what="next session opened")
    assert not snap.exists()


async def test_export_to_the_default_path_and_to_a_chosen_one(tmp_path):
    store = SessionStore()
    sid = new_session(store, title="Notes")
    app, _, _ = make_app(store)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, app, "remember this")
        await pilot.press("f3")
        await wait_until(pilot, lambda: isinstance(app.screen, PromptScreen), what="prompt")
        default = Path(app.screen.query_one("#answer", Input).value)
        assert default == store.default_export_path(sid)
        await pilot.press("enter")
        await wait_until(pilot, default.exists, what="export")
        chosen = tmp_path / "mine.md"
        await pilot.press("f3")
        await wait_until(pilot, lambda: isinstance(app.screen, PromptScreen), what="prompt")
        app.screen.query_one("#answer", Input).value = str(chosen)
        await pilot.press("enter")
        await wait_until(pilot, chosen.exists, what="export")
    text = chosen.read_text()
    assert text == default.read_text()
    assert "## User\n\nremember this" in text and "## Assistant\n\nYou said **remember this**." in text


async def test_unknown_inferlet_is_a_notification_with_the_fix():
    store = SessionStore()
    new_session(store, inferlet="no-such-inferlet")
    app, _, _ = make_app(store)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, app, "hi")
        await wait_until(pilot, lambda: app._notifications, what="notification")
        note = list(app._notifications)[-1]
        assert "no inferlet named 'no-such-inferlet'" in note.message and "Fix:" in note.message
