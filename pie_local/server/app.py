"""The ASGI app of `pie-local serve`: routes, the guard in front of them, startup and shutdown.

    app = create_app(ServerConfig(models=["gemma3-270m"]))
    uvicorn.run(app, host="127.0.0.1", port=8471)

`Guard` (pure ASGI middleware) runs before every route: it marks whether the client is local
(a loopback address), checks the API key when one is set, and cuts request bodies at
``max_body_bytes`` with a 413. Concurrent connections are bounded by uvicorn (``limit_concurrency``).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import time
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pie_local.server import openai_routes, programs
from pie_local.server.config import ServerConfig, is_loopback
from pie_local.server.errors import APIError
from pie_local.server.manager import ModelManager
from pie_local.server.programs import RunRegistry, jsonable
from pie_local.server.streaming import ClientGone

log = logging.getLogger("pie_local.server")

OPEN_PATHS = ("/health",)  # answered without the API key (liveness checks; they reveal nothing)


class Guard:
    def __init__(self, app: Any, config: ServerConfig) -> None:
        self.app = app
        self.config = config
        self._key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = scope.get("client")
        scope.setdefault("state", {})["local"] = bool(client) and is_loopback(client[0])
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self._key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            return await _send_error(send, APIError(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                                                    code="invalid_api_key",
                                                    headers={"WWW-Authenticate": "Bearer"}))
        limit = self.config.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await _send_error(send, _too_large(limit))
        seen = 0

        async def counted_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _too_large(limit)  # in the route that reads the body: the app answers 413
            return message

        await self.app(scope, counted_receive, send)

    def _authorized(self, headers: dict[str, str]) -> bool:
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
        return hmac.compare_digest(given.encode(), self._key)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body larger than {limit} bytes (the server's --max-body)", code="body_too_large")


async def _send_error(send: Callable, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---- server routes ----------------------------------------------------------------------------------


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def stats(request: Request) -> JSONResponse:
    """Models with their engines' page counts and throughput, and the runs (for monitors and tests)."""
    state = request.app.state
    now = time.monotonic()
    models = []
    for m in state.manager.loaded():
        info = m.engine.info
        models.append({"name": m.name, "active": m.active, "loaded_at": m.loaded_at,
                       "idle_s": None if m.active else round(now - m.last_used, 3),
                       "memory_bytes": info.weight_bytes + info.kv_bytes, "stats": jsonable(m.engine.stats())})
    config = state.config
    return JSONResponse({"pid": os.getpid(), "host": config.host, "port": config.port,
                         "started_at": state.started_at, "max_models": config.max_models,
                         "keep_alive_s": config.keep_alive_s, "models": models,
                         "runs": [r.summary() for r in state.runs.runs.values()]})


# ---- errors -----------------------------------------------------------------------------------------


async def _api_error(request: Request, exc: APIError) -> Response:
    return exc.response()


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    if exc.status_code == 404:
        message += " (routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/pie/...; see docs/SERVER.md)"
    return APIError(exc.status_code, message, code=code).response()


async def _client_gone(request: Request, exc: ClientGone) -> Response:
    return Response(status_code=499)  # nobody reads it: the client closed the connection


async def _internal(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error").response()


# ---- the app ----------------------------------------------------------------------------------------


def create_app(config: ServerConfig, manager: ModelManager | None = None,
               on_ready: Callable[[], None] | None = None, on_stop: Callable[[], None] | None = None) -> Any:
    """The Starlette app wrapped in its Guard. ``on_ready`` runs once the --model models are loaded."""
    manager = manager or ModelManager(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        app.state.config = config
        app.state.manager = manager
        app.state.runs = RunRegistry(manager)
        app.state.started_at = time.time()
        try:
            for name in config.models:
                manager.release(await manager.acquire(name))
            if on_ready is not None:
                on_ready()
            yield
        finally:
            await app.state.runs.close()
            await manager.close()
            if on_stop is not None:
                on_stop()

    routes = [Route("/health", health, methods=["GET"]), Route("/v1/pie/stats", stats, methods=["GET"]),
              *openai_routes.ROUTES, *programs.ROUTES]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={APIError: _api_error, HTTPException: _http_error, ClientGone: _client_gone,
                                        Exception: _internal})
    return Guard(app, config)
