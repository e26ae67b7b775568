"""`pie_local.Client`: a running `pie-local serve`, with the calls of the in-process engine.

    async with Client() as client:                    # finds the local server (or Client(url, api_key=...))
        print(await client.run("text-completion", {"prompt": "Once upon a time"}))
        h = await client.launch("chat", {"system": "Be brief."})
        await h.send("Hi!")
        async for msg in h.messages():                 # Message("text", ...) / Message("data", ...)
            ...
        h.cancel()                                     # like InferletHandle.cancel(); await it to wait

`launch` returns a `RemoteInferlet` with the `InferletHandle` surface: ``send``, ``messages``,
``result``, ``cancel``, ``done``, ``state``/``tokens``/``pages``/``elapsed``. ``chat_stream`` streams
an OpenAI chat completion's chunks; for the rest of that API, point the `openai` package at
``client.openai_base_url``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any, AsyncIterator

import httpx

from pie_local.runtime.messaging import Message
from pie_local.server.record import find_server

_FINAL = ("result", "error")


class ServerNotFound(ConnectionError):
    """No pie-local server runs for this data directory (or it cannot be reached)."""


class ClientError(RuntimeError):
    """The server answered with an error (OpenAI's error shape): status, message, code, param."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.code, self.param = status, message, code, param


class RemoteInferletError(RuntimeError):
    """The inferlet failed on the server: ``kind`` is its exception's class name."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind, self.message = kind, message


class Client:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 600.0) -> None:
        if url is None:
            found = find_server()
            if found is None:
                raise ServerNotFound("no pie-local server is running (start one with `pie-local serve`)")
            url = found.url
            if api_key is None and found.api_key_file:
                try:
                    api_key = Path(found.api_key_file).read_text().strip()
                except OSError:
                    pass
        api_key = api_key or os.environ.get("PIE_LOCAL_API_KEY")
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.api_key = api_key
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers,
                                       timeout=httpx.Timeout(timeout, connect=5.0))

    @classmethod
    def find(cls, **kwargs: Any) -> Client | None:
        """A client of the local server, or None when none runs (then use an in-process Engine)."""
        return cls(**kwargs) if find_server() is not None else None

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # ---- plain calls -------------------------------------------------------------------------------

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One JSON call; an error answer raises ClientError, an unreachable server ServerNotFound."""
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise ServerNotFound(f"cannot reach the pie-local server at {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise _error(response.status_code, response.content)
        return response.json()

    async def health(self) -> bool:
        try:
            return (await self.request("GET", "/health")).get("status") == "ok"
        except (ServerNotFound, ClientError):
            return False

    async def models(self) -> list[dict]:
        return (await self.request("GET", "/v1/models"))["data"]

    async def stats(self) -> dict:
        """Loaded models with their page counts and throughput, and the runs."""
        return await self.request("GET", "/v1/pie/stats")

    async def standard_inferlets(self) -> list[dict]:
        return (await self.request("GET", "/v1/pie/inferlets"))["data"]

    async def inferlets(self) -> list[dict]:
        """Every run the server knows (running and recently finished), like Engine.inferlets()."""
        return (await self.request("GET", "/v1/pie/runs"))["data"]

    async def cancel(self, run_id: str) -> dict:
        """Cancel a run by id (any client's); returns its summary (``state`` says how it ended)."""
        return await self.request("POST", f"/v1/pie/runs/{run_id}/cancel")

    async def chat_stream(self, messages: list[dict], model: str | None = None, **params: Any) -> AsyncIterator[dict]:
        """The chunks of a streamed chat completion (OpenAI's shape), the usage chunk last.

        ``params`` are the request's other fields (max_tokens, temperature, ...). Leaving early
        closes the connection, which cancels the generation on the server. An error the server
        sends inside the stream raises ClientError with the stream's status (200).
        """
        body = {"model": _model_ref(model or "default"), "messages": messages, **params, "stream": True,
                "stream_options": {"include_usage": True}}
        try:
            async with self._http.stream("POST", "/v1/chat/completions", json=body,
                                         timeout=httpx.Timeout(None, connect=5.0)) as response:
                if response.status_code >= 400:
                    raise _error(response.status_code, await response.aread())
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise _error(response.status_code, data.encode())
                    yield chunk
        except httpx.ConnectError as exc:
            raise ServerNotFound(f"cannot reach the pie-local server at {self.url}: {exc}") from None

    async def embed_many(self, inputs: list[str | list[int]], model: str | None = None) -> list[list[float]]:
        """One unit-length embedding per input (text or token ids), as Engine.embed_many gives them
        with the model's own pooling, through POST /v1/embeddings."""
        body = await self.request("POST", "/v1/embeddings", json={"model": _model_ref(model or "default"),
                                                                   "input": list(inputs)})
        return [item["embedding"] for item in sorted(body["data"], key=lambda item: item["index"])]

    # ---- inferlets -----------------------------------------------------------------------------------

    async def launch(self, inferlet: str | os.PathLike, args: Any = None, model: str | None = None) -> RemoteInferlet:
        """Start an inferlet (a standard name, or your own file: local servers only); returns at once."""
        name = os.fspath(inferlet)
        if name.endswith(".py") or Path(name).exists():
            name = str(Path(name).expanduser().resolve())  # the server reads it from its own filesystem
        body: dict[str, Any] = {"inferlet": name, "args": args or {}}
        if model is not None:
            body["model"] = _model_ref(model)
        return RemoteInferlet(self, await self.request("POST", "/v1/pie/runs", json=body))

    async def get(self, run_id: str) -> RemoteInferlet:
        return RemoteInferlet(self, await self.request("GET", f"/v1/pie/runs/{run_id}"))

    async def run(self, inferlet: str | os.PathLike, args: Any = None, model: str | None = None) -> Any:
        """Launch and wait for the result; cancelling the caller cancels the run."""
        handle = await self.launch(inferlet, args, model)
        try:
            return await handle.result()
        except asyncio.CancelledError:
            await asyncio.shield(handle.cancel())
            raise

    async def stream(self, inferlet: str | os.PathLike, args: Any = None,
                     model: str | None = None) -> AsyncIterator[str]:
        """The text an inferlet emits, piece by piece; leaving early cancels the run."""
        handle = await self.launch(inferlet, args, model)
        finished = False
        try:
            async for msg in handle.messages():
                if msg.kind == "text":
                    yield msg.data
            await handle.result()
            finished = True
        finally:
            if not finished:
                await asyncio.shield(handle.cancel())

    async def events(self, run_id: str, after: int = 0) -> AsyncIterator[tuple[int, dict]]:
        """(index, event) of a run from ``after`` on, over SSE, until its final event."""
        try:
            async with self._http.stream("GET", f"/v1/pie/runs/{run_id}/events", params={"after": after},
                                         timeout=httpx.Timeout(None, connect=5.0)) as response:
                if response.status_code >= 400:
                    raise _error(response.status_code, await response.aread())
                event_id, data = None, []
                async for line in response.aiter_lines():
                    if line.startswith("id:"):
                        event_id = int(line[3:].strip())
                    elif line.startswith("data:"):
                        data.append(line[5:].lstrip())
                    elif not line and data:
                        event = json.loads("\n".join(data))
                        yield event_id, event
                        if event["type"] in _FINAL:
                            return
                        event_id, data = None, []
        except httpx.ConnectError as exc:
            raise ServerNotFound(f"cannot reach the pie-local server at {self.url}: {exc}") from None


class RemoteInferlet:
    """A run on the server, with the surface of `InferletHandle`."""

    def __init__(self, client: Client, summary: dict) -> None:
        self.client = client
        self.id: str = summary["id"]
        self.name: str = summary.get("inferlet", "")
        self.model: str = summary.get("model", "")
        self._update(summary)
        self._messages_seen = 0
        self._final: dict | None = None
        self._settled = False  # state, tokens and elapsed were fetched after the end

    def _update(self, summary: dict) -> None:
        self.state: str = summary.get("state", "queued")
        self.tokens: int = summary.get("tokens", 0)
        self.pages: int = summary.get("pages", 0)
        self.elapsed: float = summary.get("elapsed_s", 0.0)

    async def refresh(self) -> RemoteInferlet:
        """Fetch state, tokens, pages and elapsed time now."""
        self._update(await self.client.request("GET", f"/v1/pie/runs/{self.id}"))
        return self

    def done(self) -> bool:
        return self._final is not None

    async def send(self, message: Any) -> None:
        """Client -> inferlet (it reads it with ``await rt.receive()``); must be JSON."""
        await self.client.request("POST", f"/v1/pie/runs/{self.id}/messages", json={"data": message})

    async def messages(self) -> AsyncIterator[Message]:
        """Inferlet -> client messages ("text" or "data") until the inferlet ends."""
        async for index, event in self.client.events(self.id, self._messages_seen):
            self._messages_seen = index + 1
            if event["type"] == "text":
                yield Message("text", event["text"])
            elif event["type"] == "message":
                yield Message("data", event["data"])
            else:
                self._finish(event)

    async def result(self) -> Any:
        """The value main() returned; RemoteInferletError if it failed, InferletCancelled if cancelled.
        Afterwards ``state``, ``tokens``, ``pages`` and ``elapsed`` are the run's final ones."""
        if self._final is None:
            async for _, event in self.client.events(self.id, self._messages_seen):
                if event["type"] in _FINAL:
                    self._finish(event)
        if not self._settled:
            self._settled = True
            with contextlib.suppress(ClientError):  # a run the server no longer keeps
                await self.refresh()
        event = self._final
        if event["type"] == "result":
            return event["result"]
        error = event["error"]
        if event.get("state") == "cancelled":
            from pie_local.runtime import InferletCancelled

            raise InferletCancelled(error["message"])
        raise RemoteInferletError(error["type"], error["message"])

    def _finish(self, event: dict) -> None:
        self._final = event
        self.state = event.get("state", self.state)

    def cancel(self) -> asyncio.Task:
        """Ask the server to cancel the run; returns the request's task (await it to wait)."""
        return asyncio.ensure_future(self._cancel())

    async def _cancel(self) -> None:
        self._update(await self.client.request("POST", f"/v1/pie/runs/{self.id}/cancel"))

    def __repr__(self) -> str:
        return f"RemoteInferlet(id={self.id!r}, name={self.name!r}, state={self.state!r})"


def _model_ref(model: str) -> str:
    """A model name as it is, a model file as an absolute path (the server has its own cwd)."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_file() else model


def _error(status: int, content: bytes) -> ClientError:
    try:
        err = json.loads(content)["error"]
        return ClientError(status, err.get("message", ""), err.get("code"), err.get("param"))
    except (ValueError, KeyError, TypeError):
        return ClientError(status, content.decode("utf-8", errors="replace")[:500])
