"""`InferletHandle`: an inferlet as its caller sees it — state, result, messages, cancel."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

from pie_local.runtime.inferlet import InferletSpec
from pie_local.runtime.limits import Limits, PageLimitError, TokenLimitError
from pie_local.runtime.messaging import ClientChannel, Message, Subscription

if TYPE_CHECKING:
    from pie_local.runtime.context import Context


class InferletCancelled(RuntimeError):
    """The inferlet was cancelled before it returned a result."""


class InferletHandle:
    def __init__(self, id: int, spec: InferletSpec, limits: Limits, parent: InferletHandle | None) -> None:
        self.id = id
        self.name = spec.name
        self.spec = spec
        self.limits = limits
        self.parent = parent
        self.state = "queued"  # queued | running | done | failed | cancelled
        self.tokens = 0  # tokens sent through the model
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.error: BaseException | None = None
        self.contexts: set[Context] = set()
        self.children: set[InferletHandle] = set()
        self.subscriptions: list[Subscription] = []
        self.channel = ClientChannel()
        self.task: asyncio.Task | None = None
        self._result: asyncio.Future = asyncio.get_running_loop().create_future()
        # the caller may never ask for the result: do not warn about an unretrieved exception
        self._result.add_done_callback(lambda f: f.cancelled() or f.exception())

    @property
    def pages(self) -> int:
        return sum(ctx.n_pages for ctx in self.contexts)

    @property
    def elapsed(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.finished_at or time.time()) - self.started_at

    async def result(self) -> Any:
        """The value main() returned; raises what it raised (InferletCancelled if cancelled)."""
        return await asyncio.shield(self._result)

    def done(self) -> bool:
        return self._result.done()

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def finish(self, value: Any) -> None:
        """main() returned ``value`` (called by the engine)."""
        self.state = "done"
        self._result.set_result(value)

    def fail(self, error: BaseException, state: str = "failed") -> None:
        """main() raised, was cancelled or ran out of time (called by the engine)."""
        self.state, self.error = state, error
        self._result.set_exception(error)

    async def send(self, message: Any) -> None:
        """Client -> inferlet (the inferlet reads it with ``await rt.receive()``)."""
        await self.channel.send_to_inferlet(message)

    async def messages(self) -> AsyncIterator[Message]:
        """Inferlet -> client messages until the inferlet ends (``Message.kind`` "text" or "data")."""
        async for msg in self.channel.client_messages():
            yield msg

    def charge(self, tokens: int, new_pages: int) -> None:
        """Called by contexts before a pass or fork: enforce this inferlet's page and token limits."""
        if self.limits.max_pages is not None and self.pages + new_pages > self.limits.max_pages:
            raise PageLimitError(f"inferlet {self.name!r} would hold {self.pages + new_pages} KV pages; "
                                 f"its limit is {self.limits.max_pages}")
        if self.limits.max_tokens is not None and self.tokens + tokens > self.limits.max_tokens:
            raise TokenLimitError(f"inferlet {self.name!r} would use {self.tokens + tokens} tokens; "
                                  f"its limit is {self.limits.max_tokens}")
        self.tokens += tokens

    def __repr__(self) -> str:
        return f"InferletHandle(id={self.id}, name={self.name!r}, state={self.state!r})"
