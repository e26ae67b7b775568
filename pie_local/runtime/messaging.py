"""Messages between inferlets and their client, and between inferlets.

- client <-> inferlet: each inferlet has a `ClientChannel`: the client sends with
  `handle.send()` and the inferlet reads with `rt.receive()`; the inferlet posts with
  `rt.send()` / `rt.emit(text)` and the client reads `handle.messages()`.
- broadcast/subscribe: a message on a topic reaches every subscription open at that moment.
- push/pull: named FIFO queues; each message is pulled by exactly one puller.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, AsyncIterator


@dataclass(frozen=True)
class Message:
    """What an inferlet sends its client: ``kind`` "text" (streamed output) or "data" (rt.send)."""

    kind: str
    data: Any


_END = object()  # closes a channel's stream to the client


class ClientChannel:
    """The two queues between one inferlet and its client."""

    def __init__(self) -> None:
        self._to_inferlet: asyncio.Queue = asyncio.Queue()
        self._to_client: asyncio.Queue = asyncio.Queue()

    async def send_to_inferlet(self, message: Any) -> None:
        await self._to_inferlet.put(message)

    async def receive_from_client(self) -> Any:
        return await self._to_inferlet.get()

    def post_to_client(self, message: Message) -> None:
        self._to_client.put_nowait(message)

    async def client_messages(self) -> AsyncIterator[Message]:
        """Messages for the client until the channel closes (every reader sees the end)."""
        while True:
            msg = await self._to_client.get()
            if msg is _END:
                self._to_client.put_nowait(_END)  # later readers end too
                return
            yield msg

    def close(self) -> None:
        """The inferlet ended: client_messages() ends for every reader."""
        self._to_client.put_nowait(_END)


class Subscription:
    """Messages broadcast on one topic since the subscription opened: ``await sub.get()`` or
    ``async for msg in sub``. Close it (or leave the ``with`` block) to stop receiving."""

    def __init__(self, bus: MessageBus, topic: str) -> None:
        self.topic = topic
        self._bus = bus
        self._queue: asyncio.Queue = asyncio.Queue()

    async def get(self) -> Any:
        return await self._queue.get()

    def get_nowait(self) -> Any:
        return self._queue.get_nowait()

    def close(self) -> None:
        self._bus._subscribers[self.topic].discard(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Any:
        return await self.get()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class MessageBus:
    """The engine-wide topics and queues."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[Subscription]] = defaultdict(set)
        self._queues: dict[str, asyncio.Queue] = defaultdict(asyncio.Queue)

    def subscribe(self, topic: str) -> Subscription:
        sub = Subscription(self, topic)
        self._subscribers[topic].add(sub)
        return sub

    def broadcast(self, topic: str, message: Any) -> int:
        """Deliver to every current subscriber of ``topic``; returns how many got it."""
        subs = list(self._subscribers.get(topic, ()))
        for sub in subs:
            sub._queue.put_nowait(message)
        return len(subs)

    def push(self, queue: str, message: Any) -> None:
        self._queues[queue].put_nowait(message)

    async def pull(self, queue: str) -> Any:
        return await self._queues[queue].get()
