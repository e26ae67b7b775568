"""The engine: one loaded model, its page pool and scheduler, and the inferlets running on it.

    async with Engine("gemma3-270m") as engine:
        print(await engine.run("text-completion", {"prompt": "Once upon a time"}))

Inferlets run as tasks on the engine's event loop; each gets a `Runtime` (its view of the
engine) and an `InferletHandle` (the caller's view of it). When an inferlet ends for any reason
(returned, raised, cancelled, ran out of wall time) its contexts are released, its child
inferlets are cancelled, and the other inferlets carry on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pie_local.driver.types import DriverParams, ModelDriver
from pie_local.runtime import embedding
from pie_local.runtime.context import Context
from pie_local.runtime.embedding import Embedding
from pie_local.runtime.forward import ForwardRequest
from pie_local.runtime.handle import InferletCancelled, InferletHandle
from pie_local.runtime.inferlet import InferletSpec, load_inferlet
from pie_local.runtime.limits import Limits, WallTimeExceeded
from pie_local.runtime.messaging import MessageBus
from pie_local.runtime.pages import PagePool
from pie_local.runtime.ps_registry import PsPublisher
from pie_local.runtime.runtime import Runtime
from pie_local.runtime.scheduler import Scheduler
from pie_local.runtime.stats import Counters, EngineStats, InferletStats
from pie_local.runtime.watchdog import LoopWatchdog

__all__ = ["Engine", "EngineConfig", "InferletCancelled", "InferletHandle", "ModelIdentity", "Runtime"]

log = logging.getLogger("pie_local.runtime")

@dataclass
class EngineConfig:
    driver: DriverParams = field(default_factory=DriverParams)  # how the model is loaded: threads, device, KV pool
    limits: Limits = field(default_factory=Limits)  # default limits of every inferlet
    chat_template: str | None = None  # overrides the model's chat template


@dataclass(frozen=True)
class ModelIdentity:
    """What a snapshot's KV is only valid for."""

    name: str
    path: str | None
    size: int
    sha256: str
    arch: str
    page_size: int
    kv_type: str
    page_bytes: int
    n_layer: int


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------

class Engine:
    def __init__(self, model: str | os.PathLike | None = None, config: EngineConfig | None = None,
                 driver: ModelDriver | None = None, tokenizer: Any = None, chat_template: Any = None) -> None:
        """``model``: a name, a path or None (the default model). Tests and embedders may pass a
        loaded ``driver`` instead, with the ``tokenizer`` and ``chat_template`` that go with it."""
        if driver is not None and model is None and (tokenizer is None or chat_template is None):
            raise ValueError("Engine(driver=...) without a model needs its tokenizer= and chat_template=")
        self.config = config or EngineConfig()
        self._model_spec = model
        self._driver = driver
        self._owns_driver = driver is None
        self._tokenizer = tokenizer
        self._chat_template = chat_template
        self.model_name = str(model) if model is not None else (driver.info.name if driver is not None else "")
        self.model_path: Path | None = None
        self._arch: str | None = None
        self._template_override: str | None = self.config.chat_template
        self._identity: ModelIdentity | None = None
        self._pool: PagePool | None = None
        self._scheduler: Scheduler | None = None
        self._bus: MessageBus | None = None
        self._counters = Counters()
        self._inferlets: dict[int, InferletHandle] = {}
        self._ids = itertools.count(1)
        self._running = False

    # ---- loading ---------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model (done by start() in a worker thread; call it yourself to load eagerly)."""
        if self._driver is not None:
            self._ensure_text_side()
            return
        from pie_local.driver import Driver

        self._resolve()
        self._driver = Driver(self.model_path, self.config.driver)
        self._ensure_text_side()

    def _resolve(self) -> None:
        """Name, path or None (the default model) -> the GGUF to load, via the models store."""
        from pie_local.models import resolve_model

        resolved = resolve_model(None if self._model_spec is None else os.fspath(self._model_spec))
        self.model_name, self.model_path, self._arch = resolved.name, Path(resolved.path), resolved.arch
        self._template_override = self.config.chat_template or resolved.chat_template

    def _ensure_text_side(self) -> None:
        if self._tokenizer is None:
            from pie_local.models.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_gguf(self.model_path)
        if self._chat_template is None and self._driver.info.embedding_only and not self._template_override:
            from pie_local.models.chat_template import ChatTemplate

            # an embedding model cannot generate (refused before any pass), so it needs no real
            # template; a built-in one keeps the engine's surface (rendering, the TUI) working
            self._chat_template = ChatTemplate.builtin("chatml")
        if self._chat_template is None:
            from pie_local.models.chat_template import ChatTemplate

            self._chat_template = ChatTemplate.for_model(self.model_path, self._arch or self._driver.info.arch,
                                                         self._template_override, tokenizer=self._tokenizer)
            # the template's tool-call markers stay in generated text, where the call parser finds them
            self._tokenizer.keep_in_text(self._chat_template.text_markers)

    @property
    def driver(self) -> ModelDriver:
        self._require_loaded()
        return self._driver

    @property
    def info(self):
        self._require_loaded()
        return self._driver.info

    @property
    def tokenizer(self):
        self._require_loaded()
        return self._tokenizer

    @property
    def chat_template(self):
        self._require_loaded()
        return self._chat_template

    def _require_loaded(self) -> None:
        if self._driver is None or self._tokenizer is None:
            raise RuntimeError("the engine has not loaded its model yet (await engine.start())")

    def identity(self) -> ModelIdentity:
        """The model identity snapshots are checked against (the file's sha256 is found once)."""
        if self._identity is None:
            from pie_local.runtime.snapshots import model_sha256

            info = self.info
            size, digest = 0, f"driver:{info.name}:{info.n_params}"
            if self.model_path is not None:
                size = self.model_path.stat().st_size
                digest = model_sha256(self.model_path)
            self._identity = ModelIdentity(self.model_name, str(self.model_path) if self.model_path else None, size,
                                           digest, info.arch, info.page_size, info.kv_type, info.page_bytes,
                                           info.n_layer)
        return self._identity

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> Engine:
        if self._running:
            return self
        if self._driver is None or self._tokenizer is None or self._chat_template is None:
            await asyncio.to_thread(self.load)
        info = self._driver.info
        self._pool = PagePool(info.n_pages, info.page_size, f"{self.model_name}:{info.arch}:{info.kv_type}")
        self._scheduler = Scheduler(self._driver, info.page_size, info.max_batch_tokens, info.max_batch_kv,
                                    self._counters)
        self._bus = MessageBus()
        self._scheduler.start(on_batch_done=self._pool.notify)
        self._running = True
        self._ps_publisher = PsPublisher(self)  # what `pie-local ps` in another process sees
        self._ps_publisher.start()
        self._watchdog = LoopWatchdog(lambda: [h for h in self._inferlets.values() if h.state == "running"])
        self._watchdog.start()
        return self

    async def stop(self) -> None:
        if not self._running:
            return
        handles = [h for h in self._inferlets.values() if h.task is not None and not h.task.done()]
        for h in handles:
            h.cancel()
        if handles:
            await asyncio.gather(*(h.task for h in handles), return_exceptions=True)
        self._watchdog.stop()
        await self._ps_publisher.stop()
        await self._scheduler.stop()
        self._running = False
        if self._owns_driver and self._driver is not None:
            self._driver.close()
            self._driver = None

    async def __aenter__(self) -> Engine:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    # ---- the surface contexts, inferlets and the server build on ---------------------------------

    @property
    def pool(self) -> PagePool:
        """The KV page pool: allocation, refcounts and the prefix index."""
        self._require_running()
        return self._pool

    @property
    def counters(self) -> Counters:
        return self._counters

    @property
    def messages(self) -> MessageBus:
        """The engine-wide topics and queues inferlets talk through."""
        self._require_running()
        return self._bus

    def submit(self, request: ForwardRequest) -> asyncio.Future:
        """Queue a forward request for the next batch; the future resolves to its ForwardOutput."""
        self._require_running()
        return self._scheduler.submit(request)

    def cancel(self, request: ForwardRequest) -> None:
        """Drop a request (a queued one now, one in flight when its batch ends)."""
        if self._scheduler is not None:
            self._scheduler.cancel(request)

    async def run_driver(self, fn: Callable, *args: Any) -> Any:
        """Run a driver call (page reads and writes) on the driver thread, ordered with the passes."""
        self._require_running()
        return await self._scheduler.run_driver(fn, *args)

    # ---- inferlets -------------------------------------------------------------------------------

    def context(self) -> Context:
        """A context owned by the caller (not by an inferlet): release() it when done."""
        self._require_running()
        return Context(self)

    async def embed(self, input: str | Sequence[int], *, pooling: str | None = None,
                    normalize: bool = True) -> Embedding:
        """The embedding of one text (or list of token ids): the model's final hidden states pooled
        ("mean", "cls", "last"; None: what the model file asks for, else mean) and, unless
        normalize=False, scaled to unit length. See runtime/embedding.py."""
        return (await self.embed_many([input], pooling=pooling, normalize=normalize))[0]

    async def embed_many(self, inputs: Sequence[str | Sequence[int]], *, pooling: str | None = None,
                         normalize: bool = True) -> list[Embedding]:
        """One embedding per input, in order, computed in the same batches."""
        self._require_running()
        info = self.info
        return await embedding.embed(self.context, self.tokenizer, info.n_vocab, info.arch, inputs, pooling,
                                     normalize)

    def launch(self, inferlet: str | os.PathLike | Callable[..., Any] | InferletSpec, args: Any = None,
               limits: Limits | None = None, parent: InferletHandle | None = None) -> InferletHandle:
        """Start an inferlet; returns at once. Argument errors raise here, before it starts."""
        self._require_running()
        spec = inferlet if isinstance(inferlet, InferletSpec) else load_inferlet(inferlet)
        parsed = spec.parse_args(args)
        handle = InferletHandle(next(self._ids), spec, limits or self.config.limits, parent)
        if parent is not None:
            parent.children.add(handle)
        self._inferlets[handle.id] = handle
        handle.task = asyncio.get_running_loop().create_task(self._run(handle, parsed), name=f"inferlet-{handle.id}")
        return handle

    async def run(self, inferlet: Any, args: Any = None, limits: Limits | None = None) -> Any:
        """Launch and wait for the result; cancelling the caller cancels the inferlet."""
        handle = self.launch(inferlet, args, limits)
        try:
            return await handle.result()
        except asyncio.CancelledError:
            handle.cancel()
            raise

    def inferlets(self) -> list[InferletHandle]:
        return list(self._inferlets.values())

    async def _run(self, handle: InferletHandle, args: Any) -> None:
        handle.state, handle.started_at = "running", time.time()
        rt = Runtime(self, handle)
        timed_out = False

        def stop_at_wall_time() -> None:
            nonlocal timed_out
            timed_out = True
            handle.task.cancel()

        wall = handle.limits.wall_time
        timer = asyncio.get_running_loop().call_later(wall, stop_at_wall_time) if wall is not None else None
        try:
            value = await handle.spec.main(rt, args)
            handle.finish(value)
        except asyncio.CancelledError:
            if timed_out:
                handle.fail(WallTimeExceeded(f"inferlet {handle.name!r} ran past its wall-time limit of {wall:g} s"))
            else:
                handle.fail(InferletCancelled(f"inferlet {handle.name!r} was cancelled"), state="cancelled")
        except Exception as exc:  # noqa: BLE001 — an inferlet's failure is reported, never propagated
            log.info("inferlet %s (%d) failed: %s", handle.name, handle.id, exc)
            handle.fail(exc)
        finally:
            if timer is not None:
                timer.cancel()
            handle.finished_at = time.time()
            self._cleanup(handle)

    def _cleanup(self, handle: InferletHandle) -> None:
        for ctx in list(handle.contexts):
            ctx.release()
        for child in list(handle.children):
            child.cancel()
        for sub in handle.subscriptions:
            sub.close()
        handle.channel.close()
        if handle.parent is not None:
            handle.parent.children.discard(handle)
        # keep finished inferlets visible for a while in stats, but bounded
        finished = [h for h in self._inferlets.values() if h.finished_at is not None]
        for old in sorted(finished, key=lambda h: h.finished_at)[:-64]:
            del self._inferlets[old.id]

    def _require_running(self) -> None:
        if not self._running:
            raise RuntimeError("the engine is not running (await engine.start() or use `async with`)")

    # ---- stats -----------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        stats = EngineStats(model=self.model_name)
        pool = self._pool
        if pool is not None:
            stats.pages_total, stats.pages_free, stats.pages_cached = pool.n_pages, pool.n_free, pool.n_cached
            stats.pages_used, stats.pages_shared = pool.n_used, pool.n_shared
        if self._scheduler is not None:
            stats.queued_requests = self._scheduler.queued
        if self._running:
            stall = self._watchdog.stall or self._watchdog.last_stall
            stats.stall = None if stall is None else stall.describe()
        stats.inferlets = [
            InferletStats(h.id, h.name, h.state, h.tokens, h.pages, round(h.elapsed, 3), h.started_at)
            for h in self._inferlets.values()
        ]
        return self._counters.fill(stats)
