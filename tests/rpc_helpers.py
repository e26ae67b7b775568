"""RPC workers for tests: real `pie-local worker` processes on loopback, on free ports, and a fake
peer that answers ggml's RPC handshake with another protocol version."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Worker:
    proc: subprocess.Popen
    port: int

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def worker_env() -> dict[str, str]:
    """This test run's environment, with the source tree importable when the tests run from it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def start_worker(threads: int = 1, *extra: str) -> Worker:
    """A `pie-local worker` on a free loopback port, once it accepts connections."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pie_local", "worker", "--port", str(port), "--threads", str(threads),
                             *extra], env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not accepts(port):
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited: {proc.stderr.read().decode(errors='replace') if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the worker did not start listening within 60 s")
        time.sleep(0.1)
    return Worker(proc, port)


@contextmanager
def workers(n: int, threads: int = 1) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    try:
        for _ in range(n):
            started.append(start_worker(threads))
        yield started
    finally:
        for w in started:
            w.kill()


@contextmanager
def other_version_peer(major: int) -> Iterator[int]:
    """A loopback peer that answers ggml RPC's HELLO (command 14, 24 bytes of capabilities) as a
    worker of protocol ``major``.0.0 would; yields its port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                request = b""
                while len(request) < 1 + 8 + 24:
                    chunk = conn.recv(64)
                    if not chunk:
                        break
                    request += chunk
                if request[:1] == bytes([14]):
                    reply = bytes([major, 0, 0, 0]) + bytes(24)
                    conn.sendall(struct.pack("<Q", len(reply)) + reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        try:
            server.shutdown(socket.SHUT_RDWR)  # wakes the accept() above
        except OSError:
            pass
        server.close()
        thread.join(timeout=5)
