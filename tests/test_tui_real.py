"""End to end with the real starter model (Gemma 3 270M) and the native driver."""

from __future__ import annotations

import pytest

from pie_local.runtime.snapshots import snapshot_path
from pie_local.tui.app import PieApp
from pie_local.tui.backend import Backend
from pie_local.tui.sessions_store import SessionSettings, SessionStore
from test_tui_sessions import info_text, send


@pytest.mark.slow
@pytest.mark.real_driver
@pytest.mark.timeout(900)
async def test_chat_with_the_starter_model_then_resume_its_kv():
    store = SessionStore()
    sid = store.create(SessionSettings("sea", "gemma3-270m", system_prompt="You are a poet.",
                                       temperature=0.0, max_tokens=12)).id
    backend = Backend()  # the real engine factory: resolve_model + native driver
    app = PieApp(backend=backend, store=store)
    async with app.run_test(size=(100, 30)) as pilot:
        await send(pilot, app, "Write one sentence about the sea.", timeout=600)
        first_info = info_text(app)
        assert backend.engine.info.arch == "gemma3"
    assert not app._notifications, [n.message for n in app._notifications]
    session = store.get(sid)
    reply = session.messages[-1]
    assert reply.role == "assistant" and reply.content.strip()
    assert reply.ttft_ms is not None and reply.ttft_ms > 0
    assert "TTFT" in first_info and "prefilled" in first_info
    assert snapshot_path(session.snapshot).exists() and session.snapshot_upto == 2

    # Restart: a new engine reopens the saved KV instead of prefilling the conversation again.
    backend = Backend()
    app = PieApp(backend=backend, store=store)
    async with app.run_test(size=(100, 30)) as pilot:
        await send(pilot, app, "And one about the sky.", timeout=600)
        second_info = info_text(app)
    assert "resumed" in second_info, second_info
    reused = int(second_info.split("resumed ")[1].split(" ")[0])
    assert reused >= reply.prefix_tokens
    assert store.get(sid).messages[-1].content.strip()
