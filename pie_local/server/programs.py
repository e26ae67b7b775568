"""Inferlets over the network: launch one by name with JSON arguments, stream its events, send
it messages, cancel it, list runs.

A `Run` is a launched inferlet plus the log of its events. One pump task per run reads the
inferlet's messages once and appends them to the log, so any number of readers (SSE streams,
polling clients) see every event, from the start or from where they left off (``?after=N`` or
the ``Last-Event-ID`` header). Events: ``{"type": "text", "text"}`` (what it emits),
``{"type": "message", "data"}`` (what it sends), then one ``{"type": "result", "result"}`` or
``{"type": "error", "error": {"type", "message"}}`` that ends the stream.

An inferlet given as a file path is the user's own Python code running with the server's
permissions: only local (loopback) clients may launch one, and only when the server allows it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pie_local.server.errors import APIError, invalid
from pie_local.server.manager import DEFAULT_ALIAS, LoadedModel, ModelManager
from pie_local.server.schema import read_json
from pie_local.server.streaming import event_stream

KEEP_FINISHED = 256  # finished runs kept for listing and late readers


def jsonable(value: Any) -> Any:
    """A result or message as JSON (dataclasses as objects, anything unknown as its str)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


@dataclass
class Run:
    id: str
    model: str
    handle: Any  # pie_local.runtime.InferletHandle
    events: list[dict] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    pump: asyncio.Task | None = None

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1]["type"] in ("result", "error")

    def add(self, event: dict) -> None:
        self.events.append(event)
        self.changed.set()
        self.changed = asyncio.Event()

    def summary(self) -> dict:
        h = self.handle
        return {"id": self.id, "inferlet": h.name, "model": self.model, "state": h.state, "tokens": h.tokens,
                "pages": h.pages, "elapsed_s": round(h.elapsed, 3), "created": self.created,
                "events": len(self.events)}

    async def follow(self, after: int = 0) -> AsyncIterator[tuple[int, dict]]:
        """(index, event) from index ``after`` on, until the final event."""
        i = after
        while True:
            while i < len(self.events):
                yield i, self.events[i]
                i += 1
            if self.done:
                return
            await self.changed.wait()


class RunRegistry:
    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager
        self.runs: dict[str, Run] = {}
        self._ids = itertools.count(1)

    def launch(self, lease: LoadedModel, inferlet: str, args: Any) -> Run:
        """Start ``inferlet`` on the borrowed model; the run gives the model back when it ends."""
        from pie_local.runtime import InferletError, load_inferlet

        try:
            try:
                spec = load_inferlet(inferlet)
            except InferletError as exc:
                raise invalid("inferlet", str(exc)) from None
            try:
                handle = lease.engine.launch(spec, args)
            except InferletError as exc:
                raise invalid("args", str(exc)) from None
        except BaseException:
            self.manager.release(lease)
            raise
        run = Run(f"run-{next(self._ids)}", lease.name, handle)
        self.runs[run.id] = run
        run.pump = asyncio.get_running_loop().create_task(self._pump(run, lease), name=f"pump-{run.id}")
        self._trim()
        return run

    async def _pump(self, run: Run, lease: LoadedModel) -> None:
        handle = run.handle
        try:
            async for msg in handle.messages():
                if msg.kind == "text":
                    run.add({"type": "text", "text": msg.data})
                else:
                    run.add({"type": "message", "data": jsonable(msg.data)})
            try:
                result = await handle.result()
                run.add({"type": "result", "result": jsonable(result), "state": handle.state})
            except Exception as exc:  # noqa: BLE001 — the inferlet's failure is its event, not ours
                run.add({"type": "error", "state": handle.state,
                         "error": {"type": type(exc).__name__, "message": str(exc)}})
        finally:
            self.manager.release(lease)

    def _trim(self) -> None:
        finished = [r for r in self.runs.values() if r.done]
        for old in sorted(finished, key=lambda r: r.created)[:-KEEP_FINISHED]:
            del self.runs[old.id]

    def get(self, run_id: str) -> Run:
        run = self.runs.get(run_id)
        if run is None:
            raise APIError(404, f"no run {run_id!r} (GET /v1/pie/runs lists them)", param="id", code="run_not_found")
        return run

    async def close(self) -> None:
        for run in self.runs.values():
            run.handle.cancel()
        pumps = [r.pump for r in self.runs.values() if r.pump is not None]
        await asyncio.gather(*pumps, return_exceptions=True)


# ---- routes -----------------------------------------------------------------------------------------


def _registry(request: Request) -> RunRegistry:
    return request.app.state.runs


async def list_inferlets(request: Request) -> JSONResponse:
    from pie_local.runtime.inferlet import load_inferlet, stdlib_names

    rows = []
    for name in stdlib_names():
        spec = load_inferlet(name)
        rows.append({"name": spec.name, "description": spec.description,
                     "parameters": {k: {"type": p.type.__name__, "required": p.required, "default": jsonable(p.default),
                                        "help": p.help} for k, p in spec.parameters.items()}})
    return JSONResponse({"object": "list", "data": rows})


async def launch(request: Request) -> JSONResponse:
    body = await read_json(request)
    inferlet = body.get("inferlet")
    if not isinstance(inferlet, str) or not inferlet.strip():
        raise invalid("inferlet", "required: a standard inferlet's name (GET /v1/pie/inferlets) or a local file path",
                      "missing_inferlet")
    args = body.get("args") or {}
    if not isinstance(args, (dict, list)):
        raise invalid("args", "expected an object of arguments (or a --key value list)", "invalid_type")
    model = body.get("model") or DEFAULT_ALIAS
    if not isinstance(model, str):
        raise invalid("model", "expected a model name", "invalid_type")
    if _is_file(inferlet):
        config = request.app.state.config
        if not config.inferlet_files:
            raise APIError(403, "inferlet: this server does not run inferlet files (started with --no-inferlet-files)",
                           param="inferlet", code="inferlet_files_disabled")
        if not request.state.local:
            raise APIError(403, "inferlet: running your own inferlet file is allowed for local clients only "
                                "(it is Python with the server's permissions)", param="inferlet",
                           code="inferlet_file_forbidden")
    elif not request.state.local and (reason := _reads_server_files(inferlet, args)):
        raise APIError(403, f"inferlet: {reason}; allowed for local clients only", param="inferlet",
                       code="inferlet_file_access_forbidden")
    registry = _registry(request)
    lease = await registry.manager.acquire(model, request.state.local)
    run = registry.launch(lease, inferlet, args)
    return JSONResponse(run.summary(), status_code=201)


def _reads_server_files(inferlet: str, args: Any) -> str | None:
    """Why a standard inferlet run would read the server's files (its tools can), or None."""
    if inferlet == "react-agent":
        tools = args.get("tools", "calculator,lookup_file") if isinstance(args, dict) else "lookup_file"
        if "lookup_file" in str(tools):
            return "react-agent's lookup_file tool reads files on the server"
    return None


def _is_file(inferlet: str) -> bool:
    return inferlet.endswith(".py") or "/" in inferlet or "\\" in inferlet or inferlet.startswith((".", "~"))


async def list_runs(request: Request) -> JSONResponse:
    runs = sorted(_registry(request).runs.values(), key=lambda r: r.created)
    return JSONResponse({"object": "list", "data": [r.summary() for r in runs]})


async def get_run(request: Request) -> JSONResponse:
    run = _registry(request).get(request.path_params["id"])
    body = run.summary()
    if run.done:
        last = run.events[-1]
        body["result" if last["type"] == "result" else "error"] = last.get("result", last.get("error"))
    return JSONResponse(body)


async def run_events(request: Request) -> Any:
    """SSE: each event as ``id: N`` + ``data: {json}``; reconnect with Last-Event-ID to resume."""
    run = _registry(request).get(request.path_params["id"])
    after = request.headers.get("last-event-id")
    after = int(after) + 1 if after is not None and after.isdigit() else None
    if after is None:
        raw = request.query_params.get("after", "0")
        if not raw.isdigit():
            raise invalid("after", "expected a non-negative integer")
        after = int(raw)

    async def events() -> AsyncIterator[dict]:
        async for i, event in run.follow(after):
            yield {"id": str(i), "data": json.dumps(event, ensure_ascii=False)}

    return event_stream(events())


async def send_message(request: Request) -> JSONResponse:
    run = _registry(request).get(request.path_params["id"])
    body = await read_json(request)
    if "data" not in body:
        raise invalid("data", 'required: the message, as {"data": ...}', "missing_data")
    if run.done or run.handle.done():
        raise APIError(409, f"run {run.id} has ended ({run.handle.state})", code="run_finished")
    await run.handle.send(body["data"])
    return JSONResponse({"id": run.id, "delivered": True})


async def cancel_run(request: Request) -> JSONResponse:
    run = _registry(request).get(request.path_params["id"])
    run.handle.cancel()
    if run.pump is not None:
        await asyncio.wait({run.pump}, timeout=5)
    return JSONResponse(run.summary())


ROUTES = [
    Route("/v1/pie/inferlets", list_inferlets, methods=["GET"]),
    Route("/v1/pie/runs", launch, methods=["POST"]),
    Route("/v1/pie/runs", list_runs, methods=["GET"]),
    Route("/v1/pie/runs/{id}", get_run, methods=["GET"]),
    Route("/v1/pie/runs/{id}", cancel_run, methods=["DELETE"]),
    Route("/v1/pie/runs/{id}/cancel", cancel_run, methods=["POST"]),
    Route("/v1/pie/runs/{id}/events", run_events, methods=["GET"]),
    Route("/v1/pie/runs/{id}/messages", send_message, methods=["POST"]),
]
