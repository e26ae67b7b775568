"""The TUI's SQLite session store: sessions, messages, snapshots, export."""

from __future__ import annotations

import sqlite3

import pytest

from pie_local import paths
from pie_local.tui.sessions_store import SessionSettings, SessionStore, to_markdown


def settings(**kw) -> SessionSettings:
    base = dict(title="Trip plan", model="gemma3-270m", system_prompt="Be brief.", temperature=0.2,
                top_p=0.9, max_tokens=64)
    base.update(kw)
    return SessionSettings(**base)


def test_store_lives_in_the_data_dir_and_persists():
    store = SessionStore()
    assert store.path == paths.sessions_db()
    created = store.create(settings())
    store.add_message(created.id, "user", "hi")
    again = SessionStore().get(created.id)  # a new connection, same file
    assert again.settings == settings()
    assert [(m.role, m.content) for m in again.messages] == [("user", "hi")]


def test_list_orders_by_last_use_and_rename_touches():
    store = SessionStore()
    a = store.create(settings(title="a"))
    b = store.create(settings(title="b"))
    assert [s.title for s in store.list()] == ["b", "a"]
    store.add_message(a.id, "user", "bump")
    assert [s.title for s in store.list()] == ["a", "b"]
    store.rename(b.id, "  renamed  ")
    assert [s.title for s in store.list()] == ["renamed", "a"]
    with pytest.raises(ValueError, match="empty"):
        store.rename(b.id, "   ")
    with pytest.raises(KeyError):
        store.rename(999, "x")


def test_delete_removes_messages_too():
    store = SessionStore()
    s = store.create(settings())
    store.add_message(s.id, "user", "q")
    store.add_message(s.id, "assistant", "a", prefix_tokens=12, ttft_ms=3.5)
    store.delete(s.id)
    assert store.list() == []
    with pytest.raises(KeyError):
        store.get(s.id)
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_message_fields_and_snapshot_bookkeeping():
    store = SessionStore()
    s = store.create(settings())
    store.add_message(s.id, "user", "q")
    reply = store.add_message(s.id, "assistant", "a", prefix_tokens=12, ttft_ms=3.5)
    store.set_snapshot(s.id, "tui-session-1", "gemma3-270m", 2)
    got = store.get(s.id)
    assert (got.snapshot, got.snapshot_model, got.snapshot_upto) == ("tui-session-1", "gemma3-270m", 2)
    assert (got.messages[1].prefix_tokens, got.messages[1].ttft_ms) == (12, 3.5)
    store.delete_message(reply.id)
    assert [m.role for m in store.get(s.id).messages] == ["user"]


@pytest.mark.parametrize("bad, error", [
    (dict(title=" "), "title"),
    (dict(model=""), "model"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top-p"),
    (dict(max_tokens=0), "max tokens"),
])
def test_settings_are_validated(bad, error):
    with pytest.raises(ValueError, match=error):
        settings(**bad)


def test_export_markdown_default_and_chosen_path(tmp_path):
    store = SessionStore()
    s = store.create(settings(title="Trip plan!"))
    store.add_message(s.id, "user", "Where to?")
    store.add_message(s.id, "assistant", "**Lisbon**.")
    path = store.export_markdown(s.id)
    assert path == paths.home() / "exports" / f"trip-plan-{s.id}.md"
    text = path.read_text()
    assert text.startswith("# Trip plan!\n")
    assert "- model: `gemma3-270m`" in text
    assert "## System\n\nBe brief." in text
    assert text.index("## User\n\nWhere to?") < text.index("## Assistant\n\n**Lisbon**.")
    chosen = store.export_markdown(s.id, tmp_path / "sub" / "out.md")
    assert chosen.read_text() == text == to_markdown(store.get(s.id))
