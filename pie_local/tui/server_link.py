"""The TUI attached to a running `pie-local serve`: what `Backend` does through the server.

- Sessions generate there: the built-in chat as a streamed chat completion of the whole
  conversation (the server's prefix cache skips the part it has seen, reported as reused
  tokens), other inferlets as runs. Cancelling closes the stream or cancels the run.
- The monitor shows the server's statistics, polled every ``POLL_S``: its loaded models' KV pages,
  throughput and prefix hits, and the runs of every client.
- The models are the server's (``GET /v1/models``), with what the local store knows of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from typing import Any
from urllib.parse import urlparse

import httpx

from pie_local.tui.backend import ChatTurn, InferletRow, ModelRow, MonitorSnapshot, finish_turn, inferlet_args
from pie_local.tui.sessions_store import Session

log = logging.getLogger("pie_local.tui")

POLL_S = 0.5
LIVE = ("queued", "running")
KEEP_FINISHED = 64  # finished runs the monitor lists (the newest), as an embedded engine keeps


class ServerLink:
    def __init__(self, client: Any) -> None:
        self.client = client  # pie_local.Client
        self.address = urlparse(client.url).netloc  # "127.0.0.1:8471"
        self.snapshot = MonitorSnapshot(model=None, server=self.address)
        self._poller: asyncio.Task | None = None
        self._answering = True
        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per poll would bury the logs screen

    async def start(self) -> None:
        await self.poll()
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever(), name="pie-tui-server-poll")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        await self.client.aclose()

    # ---- the monitor ---------------------------------------------------------------------------------

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            await self.poll()

    async def poll(self) -> None:
        """Refresh ``snapshot`` from GET /v1/pie/stats (says so when the server does not answer)."""
        from pie_local.server.client import ClientError, ServerNotFound

        try:
            stats = await self.client.stats()
        except (ServerNotFound, ClientError, httpx.HTTPError) as exc:
            if self._answering:
                log.warning("the server at %s does not answer: %s", self.address, exc)
            self._answering = False
            self.snapshot = MonitorSnapshot(model=None, server=f"{self.address} (not answering)")
            return
        self._answering = True
        self.snapshot = monitor_snapshot(stats, self.address)

    async def cancel_run(self, run_id: str) -> bool:
        """Cancel any client's run; False when the monitor last saw it ended (or never saw it)."""
        if not any(r.id == run_id and r.state in LIVE for r in self.snapshot.inferlets):
            return False
        summary = await self.client.cancel(run_id)
        await self.poll()
        return summary["state"] == "cancelled"

    # ---- models ------------------------------------------------------------------------------------------

    def models(self, local: list[ModelRow]) -> list[ModelRow]:
        """The server's models (blocking: thread workers), with the local store's details where it
        has the same name (a local server shares this data directory)."""
        from pie_local.server.client import ClientError, ServerNotFound

        headers = {"Authorization": f"Bearer {self.client.api_key}"} if self.client.api_key else {}
        try:
            response = httpx.get(f"{self.client.url}/v1/models", headers=headers, timeout=10)
        except httpx.HTTPError as exc:
            raise ServerNotFound(f"cannot reach the pie-local server at {self.client.url}: {exc}") from None
        if response.status_code >= 400:
            raise ClientError(response.status_code, response.text[:500])
        known = {row.name: replace(row, present=True) for row in local}  # the server sets up the starter itself
        return [known.get(m["id"]) or ModelRow(m["id"], "", 0, "", "") for m in response.json()["data"]]

    # ---- sessions ----------------------------------------------------------------------------------------

    async def start_turn(self, session: Session, regenerate: bool) -> ChatTurn:
        settings = session.settings
        turn = ChatTurn()
        if settings.inferlet == "chat":
            turn.task = asyncio.create_task(self._chat(turn, session, regenerate))
            turn.on_cancel = turn.task.cancel  # closing the stream cancels the generation on the server
        else:
            handle = await self.client.launch(settings.inferlet, inferlet_args(session), settings.model)
            turn.on_cancel = handle.cancel
            turn.task = asyncio.create_task(finish_turn(turn, handle, relay=True))
        return turn

    async def _chat(self, turn: ChatTurn, session: Session, regenerate: bool) -> None:
        settings = session.settings
        history = session.messages
        if regenerate and history and history[-1].role == "assistant":
            history = history[:-1]
        messages = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
        messages += [{"role": m.role, "content": m.content} for m in history]
        started = time.perf_counter()
        try:
            async for chunk in self.client.chat_stream(messages, model=settings.model, max_tokens=settings.max_tokens,
                                                       temperature=settings.temperature, top_p=settings.top_p):
                for choice in chunk["choices"]:
                    piece = choice["delta"].get("content")
                    if piece:
                        if turn.stats.ttft_ms is None:
                            turn.stats.ttft_ms = (time.perf_counter() - started) * 1000
                        turn.stats.generated += 1
                        turn.put(piece)
                usage = chunk.get("usage")
                if usage:
                    turn.stats.prefix_tokens = usage["prompt_tokens"]
                    turn.stats.reused_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                    turn.stats.generated = usage["completion_tokens"]
        except asyncio.CancelledError:
            turn.cancelled = True
        except Exception as exc:  # noqa: BLE001 - delivered to the chat view as a UserError
            turn.fail(exc)
        finally:
            turn.end()


def monitor_snapshot(stats: dict, address: str) -> MonitorSnapshot:
    """GET /v1/pie/stats as the monitor's numbers: pages and throughput summed over the loaded
    models (rates averaged), and the runs (live ones and the newest finished)."""
    models = stats["models"]
    engines = [m["stats"] for m in models]

    def total(key: str) -> Any:
        return sum(e[key] for e in engines)

    def mean(key: str) -> float:
        return total(key) / len(engines) if engines else 0.0

    runs = stats["runs"]
    finished = {r["id"] for r in [r for r in runs if r["state"] not in LIVE][-KEEP_FINISHED:]}
    shown = [r for r in runs if r["state"] in LIVE or r["id"] in finished]
    rows = tuple(InferletRow(r["id"], r["inferlet"], r["state"], r["tokens"], r["pages"], r["elapsed_s"])
                 for r in shown)
    return MonitorSnapshot(
        model=", ".join(m["name"] for m in models) or None, inferlets=rows, pages_used=total("pages_used"),
        pages_shared=total("pages_shared"), pages_free=total("pages_free"), pages_cached=total("pages_cached"),
        tokens_per_s=total("tokens_per_s"), batch_requests=mean("mean_batch_requests"),
        batch_tokens=mean("mean_batch_tokens"), prefix_hit_rate=mean("prefix_hit_rate"),
        memory_bytes=sum(m.get("memory_bytes", 0) for m in models), server=address,
    )
