"""The models a server holds: one `Engine` per model, loaded on first use, kept while used,
unloaded after the keep-alive, at most ``max_models`` at once (the least recently used idle one
makes room).

Routes borrow an engine with ``async with manager.use(name) as engine:``; a borrowed model is
never unloaded. Everything runs on the server's event loop, so no locks are needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from pie_local.server.config import ServerConfig
from pie_local.server.errors import APIError, busy

log = logging.getLogger("pie_local.server")

DEFAULT_ALIAS = "default"  # a request may name "default": the configured default model


@dataclass
class LoadedModel:
    name: str
    engine: Any  # pie_local.runtime.Engine
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    active: int = 0  # requests and runs holding it
    unload_timer: asyncio.TimerHandle | None = None


def looks_like_path(name: str) -> bool:
    """A file path rather than a model name (OWNER/REPO/FILE.gguf is a hub name, not a path)."""
    return Path(name).is_absolute() or name.startswith(("./", "../", "~")) or "\\" in name


def _default_resolve(name: str) -> str:
    """The key a model is loaded under: its installed name, or the file for a path (raises the
    models layer's ModelError when neither works)."""
    from pie_local.models import resolve_model

    resolved = resolve_model(None if name == DEFAULT_ALIAS else name)
    return str(resolved.path) if looks_like_path(name) else resolved.name


class ModelManager:
    def __init__(self, config: ServerConfig, *, resolve: Callable[[str], str] | None = None,
                 make_engine: Callable[[str], Any] | None = None) -> None:
        self.config = config
        self._resolve = resolve or _default_resolve
        self._make_engine = make_engine or self._real_engine
        self._models: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Task] = {}
        self._aliases: dict[str, str] = {}  # what requests said -> canonical name
        self._waiters: dict[str, int] = {}  # requests waiting for a model to load
        self._reaping: set[asyncio.Task] = set()

    def engine_config(self) -> Any:
        """The EngineConfig every model of this server loads with."""
        from pie_local.driver.types import DriverParams
        from pie_local.runtime import EngineConfig

        c = self.config
        return EngineConfig(driver=DriverParams(n_threads=c.threads, n_pages=c.n_pages, page_size=c.page_size,
                                                n_gpu_layers=c.n_gpu_layers, rpc=c.rpc, tensor_split=c.tensor_split))

    def _real_engine(self, name: str) -> Any:
        from pie_local.runtime import Engine

        return Engine(name, self.engine_config())

    # ---- names -------------------------------------------------------------------------------------

    async def canonical(self, requested: str, local: bool = True) -> str:
        """The installed name of ``requested``; 404 with how to get it when it is not installed."""
        if not isinstance(requested, str) or not requested.strip():
            raise APIError(400, "model: required (a model name; GET /v1/models lists them)", param="model",
                           code="missing_model")
        requested = requested.strip()
        if requested in self._models or requested in self._aliases:
            return self._aliases.get(requested, requested)
        if looks_like_path(requested) and not local:
            raise APIError(403, "model: loading a model by file path is allowed for local clients only",
                           param="model", code="model_path_forbidden")
        from pie_local.models import ModelError

        try:
            name = await asyncio.to_thread(self._resolve, requested)
        except ModelError as exc:
            raise APIError(404, f"model '{requested}' is not available: {exc}", param="model",
                           code="model_not_found") from None
        self._aliases[requested] = name
        return name

    # ---- borrowing ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, requested: str, local: bool = True) -> AsyncIterator[Any]:
        model = await self.acquire(requested, local)
        try:
            yield model.engine
        finally:
            self.release(model)

    async def acquire(self, requested: str, local: bool = True) -> LoadedModel:
        """Borrow a model (loading it if needed); pair with release()."""
        name = await self.canonical(requested, local)
        model = self._models.get(name)
        if model is None:
            task = self._loading.get(name)
            if task is None:
                await self._make_room()
                task = asyncio.get_running_loop().create_task(self._load(name), name=f"load-{name}")
                self._loading[name] = task
                task.add_done_callback(lambda _t, n=name: self._loading.pop(n, None))
            # until it is ours, a model being loaded for us must not look idle to _make_room
            self._waiters[name] = self._waiters.get(name, 0) + 1
            try:
                model = await asyncio.shield(task)
            finally:
                self._waiters[name] -= 1
        model.active += 1
        model.last_used = time.monotonic()
        if model.unload_timer is not None:
            model.unload_timer.cancel()
            model.unload_timer = None
        return model

    def release(self, model: LoadedModel) -> None:
        model.active -= 1
        model.last_used = time.monotonic()
        if model.active == 0 and self._models.get(model.name) is model and self.config.keep_alive_s is not None:
            model.unload_timer = asyncio.get_running_loop().call_later(
                self.config.keep_alive_s, self._expire, model)

    async def _load(self, name: str) -> LoadedModel:
        engine = self._make_engine(name)
        started = time.monotonic()
        try:
            await engine.start()
        except APIError:
            raise
        except Exception as exc:  # noqa: BLE001 — any load failure is the client's answer
            log.warning("cannot load model %s: %s", name, exc)
            raise APIError(500, f"cannot load model '{name}': {exc}", param="model", code="model_load_failed") from None
        log.info("loaded %s in %.1f s", name, time.monotonic() - started)
        model = LoadedModel(name, engine)
        self._models[name] = model
        return model

    async def _make_room(self) -> None:
        """Unload the least recently used idle model while a new one would exceed max_models."""
        while len(self._models) + len(self._loading) >= self.config.max_models:
            idle = [m for m in self._models.values() if m.active == 0 and not self._waiters.get(m.name)]
            if not idle:
                raise busy(f"all {self.config.max_models} model slot(s) are in use by running requests "
                           "(start the server with a larger --max-models)", retry_after_s=5, code="model_slots_busy")
            await self.unload(min(idle, key=lambda m: m.last_used).name)

    def _expire(self, model: LoadedModel) -> None:
        model.unload_timer = None
        if model.active == 0 and self._models.get(model.name) is model:
            task = asyncio.get_running_loop().create_task(self.unload(model.name))
            self._reaping.add(task)
            task.add_done_callback(self._reaping.discard)

    async def unload(self, name: str) -> None:
        model = self._models.pop(name, None)
        if model is None:
            return
        if model.unload_timer is not None:
            model.unload_timer.cancel()
        for alias in [a for a, n in self._aliases.items() if n == name]:
            del self._aliases[alias]
        await model.engine.stop()
        log.info("unloaded %s", name)

    async def close(self) -> None:
        for task in list(self._loading.values()):
            task.cancel()
        for name in list(self._models):
            await self.unload(name)

    # ---- views -------------------------------------------------------------------------------------

    def loaded(self) -> list[LoadedModel]:
        return list(self._models.values())

    def get(self, name: str) -> LoadedModel | None:
        return self._models.get(self._aliases.get(name, name))
