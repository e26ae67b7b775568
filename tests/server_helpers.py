"""Running `pie-local serve` in tests: in-process on FakeDriver engines, or as a real subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

from package_env import package_env


def never_ends(visible: list[int]) -> int:
    """A FakeDriver rule: the model always says "a" (never an end-of-generation token)."""
    return 5 + ord("a")


def fake_engine(n_pages: int = 256, page_size: int = 4, delay: float = 0.0, next_token: Any = None) -> Any:
    from runtime_helpers import fake_engine as engine_over

    from pie_local.driver.fake import FakeDriver
    from pie_local.driver.types import DriverParams
    from pie_local.runtime import EngineConfig

    params = DriverParams(page_size=page_size, n_pages=n_pages, max_batch_tokens=64)
    return engine_over(FakeDriver(params, delay=delay, next_token=next_token), EngineConfig(driver=params))


def fake_manager(config: Any, models: tuple[str, ...] = ("fake",), **engine_kw: Any) -> Any:
    """A ModelManager whose installed models are ``models``, each a FakeDriver engine."""
    from pie_local.models import UnknownModelError
    from pie_local.server.manager import ModelManager

    def resolve(name: str) -> str:
        if name not in models and name != "default":
            raise UnknownModelError(name, [])
        return models[0] if name == "default" else name

    return ModelManager(config, resolve=resolve, make_engine=lambda name: fake_engine(**engine_kw))


@contextlib.asynccontextmanager
async def serving(config: Any, manager: Any = None) -> AsyncIterator[str]:
    """The app on a free loopback port, on this event loop; yields its base URL."""
    import uvicorn

    from pie_local.server.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config.port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(config, manager), lifespan="on", log_level="warning",
                                           limit_concurrency=config.max_connections))
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


FAKE_SERVE = Path(__file__).with_name("fake_serve.py")


@contextlib.contextmanager
def serve_process(home: Path, *args: str, timeout: float = 120.0, fake_delay: float | None = None) -> Iterator[Any]:
    """`pie-local serve --port 0 ARGS` as a subprocess with its own data directory; yields its
    ServerRecord once it is ready, stops it (SIGTERM) at the end. With ``fake_delay`` (seconds per
    forward pass) the server runs FakeDriver engines (tests/fake_serve.py) instead of models."""
    log = open(home / "serve.log", "w")
    program = ["-m", "pie_local", "serve"] if fake_delay is None else [str(FAKE_SERVE), "--delay", str(fake_delay)]
    proc = subprocess.Popen([sys.executable, *program, "--port", "0", *args],
                            env=package_env(PIE_LOCAL_HOME=str(home)), stdout=log, stderr=subprocess.STDOUT,
                            cwd=home)  # not the source tree: CI runs the installed package
    record_file = home / "server.json"
    try:
        deadline = time.monotonic() + timeout
        while not record_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve did not start (exit {proc.poll()}):\n{(home / 'serve.log').read_text()}")
            time.sleep(0.05)
        from pie_local.server.record import ServerRecord

        yield ServerRecord(**json.loads(record_file.read_text())), proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
