"""Persistent chat sessions: one SQLite file under the data directory.

A session is its settings (model, inferlet, system prompt, sampling) plus its messages. It may
also name a KV snapshot (the runtime's ``Context.save``) that holds the whole conversation so far,
so resuming a chat reopens that KV instead of prefilling the history again. ``snapshot_upto`` is
the number of messages the snapshot covers; any other value means the snapshot is stale.
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from pie_local import paths

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    title          TEXT    NOT NULL,
    model          TEXT    NOT NULL,
    inferlet       TEXT    NOT NULL DEFAULT 'chat',
    system_prompt  TEXT    NOT NULL DEFAULT '',
    temperature    REAL    NOT NULL DEFAULT 0.7,
    top_p          REAL    NOT NULL DEFAULT 0.95,
    max_tokens     INTEGER NOT NULL DEFAULT 512,
    snapshot       TEXT,
    snapshot_model TEXT,
    snapshot_upto  INTEGER NOT NULL DEFAULT 0,
    created_at     REAL    NOT NULL,
    updated_at     REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id     INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    role           TEXT    NOT NULL CHECK (role IN ('user', 'assistant')),
    content        TEXT    NOT NULL,
    prefix_tokens  INTEGER,          -- KV length before this reply was generated (for regenerate)
    ttft_ms        REAL,             -- time to first token of this reply
    created_at     REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages(session_id, id);
"""


@dataclass
class SessionSettings:
    """What the user picks in the new-session dialog."""

    title: str
    model: str
    inferlet: str = "chat"
    system_prompt: str = ""
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 512

    def __post_init__(self) -> None:
        if not self.title.strip():
            raise ValueError("the session needs a title")
        if not self.model.strip():
            raise ValueError("pick a model for the session")
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError("temperature must be between 0 and 5")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top-p must be in (0, 1]")
        if not 1 <= self.max_tokens <= 1_000_000:
            raise ValueError("max tokens must be a positive integer")


@dataclass
class Message:
    id: int
    role: str
    content: str
    prefix_tokens: int | None = None
    ttft_ms: float | None = None


@dataclass
class Session:
    id: int
    settings: SessionSettings
    snapshot: str | None = None
    snapshot_model: str | None = None
    snapshot_upto: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    messages: list[Message] = field(default_factory=list)

    @property
    def title(self) -> str:
        return self.settings.title


class SessionStore:
    """Sessions and their messages. Opens one connection per call, so any thread may use it."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else paths.sessions_db()
        with self._connect() as db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA foreign_keys = ON")
        return db

    # ---- sessions ---------------------------------------------------------------------------

    def create(self, settings: SessionSettings) -> Session:
        now = time.time()
        with self._connect() as db:
            cur = db.execute(
                "INSERT INTO sessions (title, model, inferlet, system_prompt, temperature, top_p,"
                " max_tokens, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (settings.title.strip(), settings.model, settings.inferlet, settings.system_prompt,
                 settings.temperature, settings.top_p, settings.max_tokens, now, now),
            )
            session_id = int(cur.lastrowid)
        return self.get(session_id)

    def list(self) -> list[Session]:
        """All sessions, most recently used first (without their messages)."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM sessions ORDER BY updated_at DESC, id DESC").fetchall()
        return [_session_from_row(row) for row in rows]

    def get(self, session_id: int) -> Session:
        with self._connect() as db:
            row = db.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if row is None:
                raise KeyError(f"no session with id {session_id}")
            session = _session_from_row(row)
            session.messages = [
                Message(m["id"], m["role"], m["content"], m["prefix_tokens"], m["ttft_ms"])
                for m in db.execute(
                    "SELECT * FROM messages WHERE session_id = ? ORDER BY id", (session_id,)
                )
            ]
        return session

    def rename(self, session_id: int, title: str) -> None:
        if not title.strip():
            raise ValueError("the title cannot be empty")
        self._update(session_id, "title = ?", (title.strip(),))

    def delete(self, session_id: int) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

    def set_snapshot(self, session_id: int, name: str | None, model: str | None, upto: int) -> None:
        self._update(session_id, "snapshot = ?, snapshot_model = ?, snapshot_upto = ?", (name, model, upto))

    def _update(self, session_id: int, assignments: str, values: tuple) -> None:
        with self._connect() as db:
            cur = db.execute(
                f"UPDATE sessions SET {assignments}, updated_at = ? WHERE id = ?",
                (*values, time.time(), session_id),
            )
            if cur.rowcount == 0:
                raise KeyError(f"no session with id {session_id}")

    # ---- messages ---------------------------------------------------------------------------

    def add_message(self, session_id: int, role: str, content: str, *, prefix_tokens: int | None = None,
                    ttft_ms: float | None = None) -> Message:
        with self._connect() as db:
            cur = db.execute(
                "INSERT INTO messages (session_id, role, content, prefix_tokens, ttft_ms, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (session_id, role, content, prefix_tokens, ttft_ms, time.time()),
            )
            message_id = int(cur.lastrowid)
            db.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (time.time(), session_id))
        return Message(message_id, role, content, prefix_tokens, ttft_ms)

    def delete_message(self, message_id: int) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    # ---- export -----------------------------------------------------------------------------

    def default_export_path(self, session_id: int) -> Path:
        session = self.get(session_id)
        slug = re.sub(r"[^a-z0-9]+", "-", session.title.lower()).strip("-") or "session"
        return paths.home() / "exports" / f"{slug}-{session.id}.md"

    def export_markdown(self, session_id: int, path: Path | None = None) -> Path:
        """Write the conversation as Markdown; default path: <data dir>/exports/<title>-<id>.md."""
        session = self.get(session_id)
        path = Path(path).expanduser() if path is not None else self.default_export_path(session_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_markdown(session), encoding="utf-8")
        return path


def to_markdown(session: Session) -> str:
    s = session.settings
    lines = [
        f"# {s.title}",
        "",
        f"- model: `{s.model}`",
        f"- inferlet: `{s.inferlet}`",
        f"- temperature: {s.temperature:g}, top-p: {s.top_p:g}, max tokens: {s.max_tokens}",
        "",
    ]
    if s.system_prompt:
        lines += ["## System", "", s.system_prompt, ""]
    for message in session.messages:
        lines += [f"## {message.role.capitalize()}", "", message.content, ""]
    return "\n".join(lines)


def _session_from_row(row: sqlite3.Row) -> Session:
    settings = SessionSettings(
        title=row["title"], model=row["model"], inferlet=row["inferlet"],
        system_prompt=row["system_prompt"], temperature=row["temperature"], top_p=row["top_p"],
        max_tokens=row["max_tokens"],
    )
    return Session(
        id=row["id"], settings=settings, snapshot=row["snapshot"], snapshot_model=row["snapshot_model"],
        snapshot_upto=row["snapshot_upto"], created_at=row["created_at"], updated_at=row["updated_at"],
    )
