"""Where `run` and `chat` do their work: on a running `pie-local serve`, or on an engine of their own.

Without options a command uses the local server when one runs (found through its record in the
data directory) and otherwise loads the model itself, so it works with nothing started.
``--local`` always loads the model in this process; ``--server URL`` names a server, which must
answer. Both targets launch inferlets and give back handles with the same surface (``messages``,
``send``, ``result``, ``state``, ``tokens``, ``elapsed``), so the commands do not care which.
Leaving a target cancels what it launched and is still running (Ctrl-C cancels a run on the server).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

LIVE = ("queued", "running")


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true",
                       help="load the model in this process, even when a pie-local server runs")
    where.add_argument("--server", metavar="URL", default=None,
                       help="use the pie-local server at URL (default: the local server, when one runs)")


def server_client(args: argparse.Namespace) -> Any:
    """A `pie_local.Client` of the server to use, or None for an engine in this process.

    A server found through its record that does not answer is skipped with a note on stderr; one
    named with --server is used as it is (its errors say it does not answer). Device options
    (--gpu-layers, --rpc, --tensor-split) mean a model loaded here, which alone can follow them.
    """
    from pie_local.present.problems import UsageError
    from pie_local.server.client import Client
    from pie_local.server.record import find_server

    if getattr(args, "local", False):
        return None
    own_devices = getattr(args, "rpc", ()) or getattr(args, "tensor_split", ()) or getattr(args, "gpu_layers", -1) != -1
    if getattr(args, "server", None):
        if own_devices:
            raise UsageError("--gpu-layers, --rpc and --tensor-split place a model loaded here; a server places its "
                             "own (give them to `pie-local serve`), so drop them or --server")
        return Client(args.server)
    if own_devices:  # a placement of its own: only a model loaded here has one
        return None
        return Client(args.server)
    record = find_server()
    if record is None:
        return None
    if not answers(record.url):
        print(f"pie-local: the server at {record.url} does not answer; running in this process", file=sys.stderr)
        return None
    return Client.find()


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether a pie-local server answers /health at ``url`` (it needs no API key)."""
    import httpx

    try:
        return httpx.get(f"{url.rstrip('/')}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def describe_failure(exc: BaseException) -> str:
    """"ValueError: message" for an inferlet's failure, here or on a server."""
    kind = getattr(exc, "kind", None)  # RemoteInferletError: the inferlet's exception class
    return f"{kind}: {exc.message}" if kind else f"{type(exc).__name__}: {exc}"


class EngineTarget:
    """An engine in this process (what `pie-local run` always did)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def label(self) -> str:
        return self.engine.model_name

    async def start(self) -> None:
        await self.engine.start()

    async def launch(self, inferlet: Any, args: dict) -> Any:
        return self.engine.launch(inferlet, args)

    async def cancel(self, handle: Any) -> None:
        handle.cancel()

    async def close(self) -> None:
        await self.engine.stop()  # cancels what still runs


class ServerTarget:
    """A pie-local server: inferlets run there, on the model it holds (``--model`` goes to it)."""

    def __init__(self, client: Any, model: str | None) -> None:
        self.client = client
        self.model = model
        self.handles: list[Any] = []

    @property
    def model_name(self) -> str:
        return self.handles[-1].model if self.handles else (self.model or "default")

    @property
    def label(self) -> str:
        return f"{self.model_name} on the server at {self.client.url}"

    async def start(self) -> None:
        pass

    async def launch(self, inferlet: Any, args: dict) -> Any:
        handle = await self.client.launch(_reference(inferlet), dict(args), self.model)
        self.handles.append(handle)
        return handle

    async def cancel(self, handle: Any) -> None:
        await handle.cancel()

    async def close(self) -> None:
        try:
            for handle in self.handles:
                if handle.state in LIVE and not handle.done():
                    with contextlib.suppress(Exception):
                        await asyncio.shield(handle.cancel())
        finally:
            await self.client.aclose()


def _reference(inferlet: Any) -> str:
    """What the server launches: a standard inferlet's name, or the path of the user's own file."""
    if isinstance(inferlet, str):
        return inferlet
    source = Path(inferlet.source)  # an InferletSpec loaded here to check its arguments
    return str(source) if source.exists() else inferlet.name


@contextlib.asynccontextmanager
async def open_target(args: argparse.Namespace) -> AsyncIterator[EngineTarget | ServerTarget]:
    """The server to use, or a started engine of this process; closed (and its runs cancelled) on exit."""
    from pie_local.cli import run as run_cmd  # its make_engine, which tests replace

    client = server_client(args)
    target = EngineTarget(run_cmd.make_engine(args)) if client is None else ServerTarget(client, args.model)
    await target.start()
    try:
        yield target
    finally:
        await target.close()
