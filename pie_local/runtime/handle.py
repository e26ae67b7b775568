"""An inferlet from both sides: `InferletHandle` (what its caller holds) and `Runtime` (what its
``main(rt, args)`` receives)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

from pie_local.runtime.context import Context
from pie_local.runtime.inferlet import InferletSpec
from pie_local.runtime.limits import Limits, PageLimitError, TokenLimitError
from pie_local.runtime.messaging import Message, Subscription

if TYPE_CHECKING:
    from pie_local.runtime.engine import Engine

_END = object()  # closes an inferlet's outbox


class InferletCancelled(RuntimeError):
    """The inferlet was cancelled before it returned a result."""


# --------------------------------------------------------------------------------------------
# An inferlet as seen by its caller
# --------------------------------------------------------------------------------------------

class InferletHandle:
    def __init__(self, id: int, spec: InferletSpec, limits: Limits, parent: InferletHandle | None) -> None:
        self.id = id
        self.name = spec.name
        self.spec = spec
        self.limits = limits
        self.parent = parent
        self.state = "queued"
        self.tokens = 0  # tokens sent through the model
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.error: BaseException | None = None
        self.contexts: set[Context] = set()
        self.children: set[InferletHandle] = set()
        self.subscriptions: list[Subscription] = []
        self.task: asyncio.Task | None = None
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._outbox: asyncio.Queue = asyncio.Queue()
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

    async def send(self, message: Any) -> None:
        """Client -> inferlet (the inferlet reads it with ``await rt.receive()``)."""
        await self._inbox.put(message)

    async def messages(self) -> AsyncIterator[Message]:
        """Inferlet -> client messages until the inferlet ends (``Message.kind`` "text" or "data")."""
        while True:
            msg = await self._outbox.get()
            if msg is _END:
                self._outbox.put_nowait(_END)  # later readers end too
                return
            yield msg

    def close_messages(self) -> None:
        """The inferlet ended: messages() ends for every reader."""
        self._outbox.put_nowait(_END)

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


# --------------------------------------------------------------------------------------------
# The engine as seen by an inferlet
# --------------------------------------------------------------------------------------------

class Runtime:
    """Passed to ``main(rt, args)``."""

    def __init__(self, engine: Engine, handle: InferletHandle) -> None:
        self.engine = engine
        self.handle = handle

    @property
    def id(self) -> int:
        return self.handle.id

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def chat_template(self):
        return self.engine.chat_template

    def context(self) -> Context:
        return Context(self.engine, owner=self.handle)

    async def open(self, name: str) -> Context:
        """A context restored from the named snapshot."""
        return await Context.open(self, name)

    # client messages
    def send(self, message: Any) -> None:
        self.handle._outbox.put_nowait(Message("data", message))

    def emit(self, text: str) -> None:
        if text:
            self.handle._outbox.put_nowait(Message("text", text))

    async def receive(self) -> Any:
        return await self.handle._inbox.get()

    # between inferlets
    def broadcast(self, topic: str, message: Any) -> int:
        return self.engine._bus.broadcast(topic, message)

    def subscribe(self, topic: str) -> Subscription:
        sub = self.engine._bus.subscribe(topic)
        self.handle.subscriptions.append(sub)
        return sub

    def push(self, queue: str, message: Any) -> None:
        self.engine._bus.push(queue, message)

    async def pull(self, queue: str) -> Any:
        return await self.engine._bus.pull(queue)

    def spawn(self, inferlet: Any, args: Any = None, limits: Limits | None = None) -> InferletHandle:
        """Start a child inferlet (cancelled when this one ends)."""
        return self.engine.launch(inferlet, args, limits, parent=self.handle)

    async def launch(self, inferlet: Any, args: Any = None, limits: Limits | None = None) -> Any:
        """Run a child inferlet and return its result."""
        return await self.spawn(inferlet, args, limits).result()
