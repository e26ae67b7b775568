"""Streaming responses and client disconnects.

`sse_response` sends dicts as Server-Sent Events (``data: {json}``), ends with ``data: [DONE]``
and runs ``cleanup`` whatever happens: done, failed, or the client went away (sse-starlette then
cancels the generator, which cancels the generation). `until_disconnect` gives a non-streamed
request the same property: when the client hangs up, the work is cancelled instead of finishing
for nobody.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request

from pie_local.server.errors import APIError

log = logging.getLogger("pie_local.server")


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


async def _events(items: AsyncIterator[dict]) -> AsyncIterator[dict]:
    try:
        async for item in items:
            yield {"data": json.dumps(item, ensure_ascii=False)}
    except APIError as exc:  # the status line is sent already: the error travels as an event
        yield {"data": json.dumps(exc.body())}
        return
    except Exception as exc:  # noqa: BLE001
        log.exception("stream failed")
        yield {"data": json.dumps(APIError(500, f"internal error: {exc}").body())}
        return
    yield {"data": "[DONE]"}


class _WithCleanup:
    """An ASGI response that runs ``cleanup`` after the wrapped one, however it ended."""

    def __init__(self, response: Any, cleanup: Callable[[], None]) -> None:
        self.response = response
        self.cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.response(scope, receive, send)
        finally:
            self.cleanup()


def sse_response(items: AsyncIterator[dict], cleanup: Callable[[], None]) -> Any:
    """OpenAI's stream: each item as ``data: {json}``, then ``data: [DONE]``."""
    return _WithCleanup(EventSourceResponse(_events(items)), cleanup)


def event_stream(events: AsyncIterator[dict]) -> EventSourceResponse:
    """Server-Sent Events given as sse-starlette dicts (``id``, ``event``, ``data``)."""
    return EventSourceResponse(events)


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``; cancel it and raise ClientGone if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def wait_for_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if task.cancelled() or not task.done():
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone()
    return task.result()
