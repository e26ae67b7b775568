"""Sessions: the list of persistent chats and the chat view of the selected one."""

from __future__ import annotations

import asyncio
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Input, Label, ListItem, ListView, Markdown, Static

from pie_local.present.problems import UserError
from pie_local.tui.backend import STARTER_MODEL, ChatTurn, TurnStats, explain
from pie_local.tui.screens.dialogs import ConfirmScreen, PromptScreen
from pie_local.tui.screens.new_session import NewSessionScreen
from pie_local.tui.sessions_store import Session, SessionSettings
from pie_local.tui.widgets.chat_view import ChatView
from pie_local.tui.widgets.status_bar import StatusBar


class SessionItem(ListItem):
    def __init__(self, session: Session) -> None:
        super().__init__(Label(session.title, markup=False), Label(session.settings.model, classes="model", markup=False))
        self.session_id = session.id


class SessionsScreen(Screen):
    CSS_PATH = "sessions.tcss"
    BINDINGS = [
        Binding("ctrl+n", "new_session", "New"),
        Binding("escape", "cancel_reply", "Cancel reply", show=False),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("f2", "rename", "Rename"),
        Binding("f3", "export", "Export"),
        Binding("f8", "delete", "Delete"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.session_id: int | None = None
        self.turn: ChatTurn | None = None

    @property
    def store(self):
        return self.app.store

    def compose(self) -> ComposeResult:
        with Horizontal():
            with Vertical(id="sidebar"):
                yield Label("Sessions", classes="heading")
                yield ListView(id="session-list")
            with Vertical(id="chat"):
                yield Label("", id="chat-title", markup=False)
                yield ChatView(id="messages")
                yield Static("", id="turn-info")
                yield Input(placeholder="Message (enter to send, ctrl+n for a new session)", id="prompt")
        yield StatusBar()
        yield Footer()

    async def on_mount(self) -> None:
        await self.reload_list()

    async def reload_list(self, select: int | None = None) -> None:
        sessions = self.store.list()
        view = self.query_one("#session-list", ListView)
        await view.clear()
        await view.extend(SessionItem(s) for s in sessions)
        wanted = select if select is not None else self.session_id
        ids = [s.id for s in sessions]
        if wanted in ids:
            view.index = ids.index(wanted)
            await self.open_session(wanted)
        elif sessions:
            view.index = 0
            await self.open_session(sessions[0].id)
        else:
            await self.open_session(None)

    @on(ListView.Selected, "#session-list")
    async def _selected(self, event: ListView.Selected) -> None:
        if isinstance(event.item, SessionItem) and event.item.session_id != self.session_id:
            await self.open_session(event.item.session_id)
            self.query_one("#prompt", Input).focus()

    async def open_session(self, session_id: int | None) -> None:
        if self.turn is not None and session_id != self.session_id:
            self.turn.cancel()
        self.session_id = session_id
        chat = self.query_one("#messages", ChatView)
        info = self.query_one("#turn-info", Static)
        if session_id is None:
            self.query_one("#chat-title", Label).update("No sessions yet")
            await chat.show([], "Press ctrl+n to start a chat session.")
            info.update("")
            return
        session = self.store.get(session_id)
        s = session.settings
        self.query_one("#chat-title", Label).update(f"{s.title} · {s.model} · {s.inferlet}")
        await chat.show(session.messages, "Say something to start.")
        last = next((m for m in reversed(session.messages) if m.role == "assistant"), None)
        kv = "KV saved" if session.snapshot and session.snapshot_upto == len(session.messages) else "no saved KV"
        info.update(f"{len(session.messages)} messages · {kv}" + (
            f" · last TTFT {last.ttft_ms:.0f} ms" if last and last.ttft_ms is not None else ""))

    # ---- sending and generating ----

    @on(Input.Submitted, "#prompt")
    async def _send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.session_id is None:
            self.app.notify("Create a session first (ctrl+n).", severity="warning")
            return
        if self.busy:
            self.app.notify("A reply is still being generated (Esc cancels it).", severity="warning")
            return
        event.input.value = ""
        self.query_one("#turn-info", Static).update("waiting for the model…")
        self.store.add_message(self.session_id, "user", text)
        await self.query_one("#messages", ChatView).add_user(text)
        self.generate(self.session_id, regenerate=False)

    @property
    def busy(self) -> bool:
        """A reply is being generated (or its model is loading)."""
        return any(w.group == "generate" and not w.is_finished for w in self.workers)

    def action_regenerate(self) -> None:
        if self.session_id is None or self.busy:
            return
        session = self.store.get(self.session_id)
        if not session.messages:
            self.app.notify("Nothing to regenerate yet.", severity="warning")
            return
        self.query_one("#turn-info", Static).update("waiting for the model…")
        self.generate(self.session_id, regenerate=session.messages[-1].role == "assistant")

    def action_cancel_reply(self) -> None:
        if self.turn is not None:
            self.turn.cancel()

    @work(exclusive=True, group="generate", exit_on_error=False)
    async def generate(self, session_id: int, regenerate: bool) -> None:
        """Stream one reply into the chat view, then store it (and the snapshot that now covers it)."""
        chat = self.query_one("#messages", ChatView)
        info = self.query_one("#turn-info", Static)
        session = self.store.get(session_id)
        backend = self.app.backend
        if backend.model_name != session.settings.model:
            info.update(f"loading {session.settings.model}…")
        if regenerate:
            await chat.drop_last_reply()
        reply = await chat.start_reply()
        stream = Markdown.get_stream(reply)
        text: list[str] = []
        turn: ChatTurn | None = None
        try:
            turn = self.turn = await backend.start_turn(session, regenerate=regenerate)
            if regenerate:
                self.store.delete_message(session.messages[-1].id)
            info.update("generating… (Esc cancels)")
            async for piece in turn.pieces():
                text.append(piece)
                if reply.is_attached:  # the user may have switched to another session
                    await stream.write(piece)
        except UserError as exc:
            self.app.report_error(exc)
        finally:
            await stream.stop()
            self.turn = None
        reply_text = "".join(text)
        cancelled = turn is not None and turn.cancelled
        visible = self.session_id == session_id
        if not reply_text:
            if visible:
                await self.open_session(session_id)  # show exactly what is stored
                info.update("cancelled" if cancelled else "no reply")
            return
        stats = turn.stats
        self.store.add_message(session_id, "assistant", reply_text, prefix_tokens=stats.prefix_tokens,
                               ttft_ms=stats.ttft_ms)
        if stats.snapshot and not cancelled:
            self.store.set_snapshot(session_id, stats.snapshot, backend.model_name, stats.upto)
        if visible:
            info.update(self._turn_summary(stats, cancelled))

    @staticmethod
    def _turn_summary(stats: TurnStats, cancelled: bool) -> str:
        parts = []
        if stats.ttft_ms is not None:
            parts.append(f"TTFT {stats.ttft_ms:.0f} ms")
        if stats.reused_tokens:
            parts.append(f"resumed {stats.reused_tokens} KV tokens")
        elif stats.prefix_tokens is not None:
            parts.append(f"prefilled {stats.prefix_tokens} tokens")
        parts.append(f"{stats.generated} tokens")
        if cancelled:
            parts.append("cancelled")
        return " · ".join(parts)

    # ---- session management ----

    def action_new_session(self) -> None:
        self.new_session()

    @work(exclusive=True, group="dialog", exit_on_error=False)
    async def new_session(self) -> None:
        try:
            # the starter model is usable before it is set up (it is assembled on first use)
            models = [m.name for m in await asyncio.to_thread(self.app.backend.installed)
                      if m.present or m.name == STARTER_MODEL]
        except UserError as exc:
            self.app.report_error(exc)
            models = []
        if self.app.default_model and self.app.default_model not in models:
            models.insert(0, self.app.default_model)  # `pie-local tui --model NAME|PATH`
        if not models:
            self.app.notify("No model installed yet: set up the starter model on the Models screen (press 2, then s).",
                            severity="warning", timeout=8)
            return
        n = len(self.store.list()) + 1
        settings: SessionSettings | None = await self.app.push_screen_wait(
            NewSessionScreen(models, self.app.backend.inferlets(), self.app.default_model, title=f"Chat {n}"))
        if settings is None:
            return
        session = self.store.create(settings)
        await self.reload_list(select=session.id)
        self.query_one("#prompt", Input).focus()

    def action_rename(self) -> None:
        if self.session_id is not None:
            self.rename()

    @work(exclusive=True, group="dialog", exit_on_error=False)
    async def rename(self) -> None:
        session = self.store.get(self.session_id)
        title = await self.app.push_screen_wait(PromptScreen("Rename session", session.title, ok_label="Rename"))
        if title:
            self.store.rename(session.id, title)
            await self.reload_list(select=session.id)

    def action_delete(self) -> None:
        if self.session_id is not None:
            self.delete()

    @work(exclusive=True, group="dialog", exit_on_error=False)
    async def delete(self) -> None:
        session = self.store.get(self.session_id)
        if not await self.app.push_screen_wait(ConfirmScreen(f"Delete session “{session.title}” and its saved KV?")):
            return
        if self.turn is not None:
            self.turn.cancel()
        self.store.delete(session.id)
        if session.snapshot:
            self.app.backend.delete_snapshot(session.snapshot)
        self.session_id = None
        await self.reload_list()
        self.app.notify(f"Deleted “{session.title}”.")

    def action_export(self) -> None:
        if self.session_id is not None:
            self.export()

    @work(exclusive=True, group="dialog", exit_on_error=False)
    async def export(self) -> None:
        session_id = self.session_id
        target = await self.app.push_screen_wait(PromptScreen(
            "Export to Markdown file", str(self.store.default_export_path(session_id)), ok_label="Export"))
        if not target:
            return
        try:
            path = self.store.export_markdown(session_id, Path(target))
        except OSError as exc:
            self.app.report_error(explain(exc))
            return
        self.app.notify(f"Exported to {path}")
