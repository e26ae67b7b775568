"""The conversation of one session: user messages as text, assistant replies as Markdown."""

from __future__ import annotations

from textual.containers import VerticalScroll
from textual.widgets import Markdown, Static

from pie_local.tui.sessions_store import Message


class UserMessage(Static):
    DEFAULT_CSS = """
    UserMessage {
        margin: 1 1 0 6;
        padding: 0 1;
        background: $boost;
        border-left: thick $accent;
    }
    """

    def __init__(self, text: str) -> None:
        super().__init__(text, markup=False)


class AssistantMessage(Markdown):
    DEFAULT_CSS = """
    AssistantMessage {
        margin: 1 6 0 1;
        padding: 0 1;
        border-left: thick $success;
    }
    """


class ChatView(VerticalScroll):
    """Messages in order; ``start_reply`` returns the Markdown widget a reply streams into."""

    DEFAULT_CSS = """
    ChatView { height: 1fr; }
    ChatView > .empty { color: $text-muted; margin: 1 2; }
    """

    async def show(self, messages: list[Message], empty_hint: str = "") -> None:
        await self.remove_children()
        widgets = [UserMessage(m.content) if m.role == "user" else AssistantMessage(m.content) for m in messages]
        if not widgets and empty_hint:
            widgets = [Static(empty_hint, classes="empty")]
        await self.mount_all(widgets)
        self.scroll_end(animate=False)

    async def add_user(self, text: str) -> None:
        await self.query(".empty").remove()
        await self.mount(UserMessage(text))
        self.scroll_end(animate=False)

    async def start_reply(self) -> AssistantMessage:
        reply = AssistantMessage("")
        await self.mount(reply)
        self.anchor()  # keep following the end while the reply grows
        return reply

    async def drop_last_reply(self) -> None:
        replies = self.query(AssistantMessage)
        if replies:
            await replies.last().remove()
