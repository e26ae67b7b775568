"""`Runtime`: the engine as an inferlet sees it — the ``rt`` that ``main(rt, args)`` receives."""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pie_local.runtime import embedding
from pie_local.runtime.context import Context
from pie_local.runtime.embedding import Embedding
from pie_local.runtime.handle import InferletHandle
from pie_local.runtime.limits import Limits
from pie_local.runtime.messaging import Message, Subscription

if TYPE_CHECKING:
    from pie_local.runtime.engine import Engine


class Runtime:
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

    async def embed_many(self, inputs: Sequence[str | Sequence[int]], *, pooling: str | None = None,
                         normalize: bool = True) -> list[Embedding]:
        """Engine.embed_many, in contexts this inferlet owns (its limits apply)."""
        info = self.engine.info
        return await embedding.embed(self.context, self.tokenizer, info.n_vocab, info.arch, inputs, pooling,
                                     normalize)

    async def open(self, name: str) -> Context:
        """A context restored from the named snapshot."""
        return await Context.open(self, name)

    async def run_blocking(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run blocking code (sync I/O, heavy computation) in a worker thread. Every inferlet shares
        one event loop: blocking it stalls them all, and the engine's watchdog reports it."""
        return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))

    # client messages
    def send(self, message: Any) -> None:
        self.handle.channel.post_to_client(Message("data", message))

    def emit(self, text: str) -> None:
        if text:
            self.handle.channel.post_to_client(Message("text", text))

    async def receive(self) -> Any:
        return await self.handle.channel.receive_from_client()

    # between inferlets
    def broadcast(self, topic: str, message: Any) -> int:
        return self.engine.messages.broadcast(topic, message)

    def subscribe(self, topic: str) -> Subscription:
        sub = self.engine.messages.subscribe(topic)
        self.handle.subscriptions.append(sub)
        return sub

    def push(self, queue: str, message: Any) -> None:
        self.engine.messages.push(queue, message)

    async def pull(self, queue: str) -> Any:
        return await self.engine.messages.pull(queue)

    def spawn(self, inferlet: Any, args: Any = None, limits: Limits | None = None) -> InferletHandle:
        """Start a child inferlet (cancelled when this one ends)."""
        return self.engine.launch(inferlet, args, limits, parent=self.handle)

    async def launch(self, inferlet: Any, args: Any = None, limits: Limits | None = None) -> Any:
        """Run a child inferlet and return its result."""
        return await self.spawn(inferlet, args, limits).result()
