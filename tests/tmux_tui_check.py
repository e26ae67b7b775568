"""Drive the real TUI in tmux: start, open models, set up the starter model, start a session, send
a message, see a reply, quit. Fails on any traceback on screen (and on a step that never shows up).
With --server, a `pie-local serve` on the starter model is started first: the TUI must attach to
it (its status bar says `server 127.0.0.1:PORT`), generate there, and leave it running on quit.

    python tests/tmux_tui_check.py [--server] [--keep-home] [--timeout 120]

Runs `python -m pie_local` (no arguments opens the TUI) in a detached tmux session of a fixed size
with its own empty PIE_LOCAL_HOME. Exit status 0 when every step passed; otherwise the last screen
is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from package_env import package_env
from server_helpers import serve_process

WIDTH, HEIGHT = 100, 30


class CheckFailed(Exception):
    pass


class Tmux:
    def __init__(self, session: str) -> None:
        self.session = session

    def run(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(["tmux", *args], capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise CheckFailed(f"tmux {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def start(self, command: str, env: dict[str, str], cwd: str) -> None:
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        self.run("new-session", "-d", "-s", self.session, "-x", str(WIDTH), "-y", str(HEIGHT),
                 f"cd {shlex.quote(cwd)} && env {exports} {command}; echo PIE-EXITED $?; sleep 30")

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.session, check=False)

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", self.session, *keys)

    def text(self, text: str) -> None:
        self.run("send-keys", "-t", self.session, "-l", text)

    def kill(self) -> None:
        self.run("kill-session", "-t", self.session, check=False)


def wait_for(tmux: Tmux, text: str, timeout: float, step: str, regex: bool = False) -> str:
    """Poll the screen until `text` (a regular expression if `regex`) shows; fail at once on a traceback."""
    pattern = text if regex else re.escape(text)
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux.screen()
        if "Traceback" in screen:
            raise CheckFailed(f"{step}: traceback on screen\n{screen}")
        if re.search(pattern, screen):
            return screen
        time.sleep(0.25)
    raise CheckFailed(f"{step}: {text!r} did not appear within {timeout:.0f} s\n{screen}")


def chat_once(tmux: Tmux, timeout: float) -> str:
    """From the sessions screen: a new session with short replies, one message, its reply; the screen."""
    wait_for(tmux, "ctrl+n", 10, "sessions screen")
    tmux.keys("C-n")
    wait_for(tmux, "New session", 10, "new-session dialog")
    time.sleep(0.5)
    tmux.keys("Tab", "Tab", "Tab", "Tab", "Tab")  # title -> model, inferlet, temperature, top-p, max tokens
    time.sleep(0.5)
    tmux.text("24")  # a short reply: the starter is a base model that rarely stops by itself
    wait_for(tmux, r"Max tokens\s+24\b", 5, "max tokens", regex=True)
    tmux.keys("C-s")
    wait_for(tmux, "Say something to start", 10, "session created")
    tmux.text("Write one sentence about the sea.")
    tmux.keys("Enter")
    return wait_for(tmux, "TTFT", timeout, "reply")


def quit_tui(tmux: Tmux) -> None:
    tmux.keys("C-q")
    wait_for(tmux, "PIE-EXITED 0", 30, "quit")


@contextlib.contextmanager
def tui_session(keep_home: bool) -> Iterator[tuple[Tmux, dict[str, str], str]]:
    if shutil.which("tmux") is None:
        raise CheckFailed("tmux is not installed: install it (e.g. `apt-get install tmux`) to run this check")
    home = tempfile.mkdtemp(prefix="pie-tmux-home-")
    tmux = Tmux(f"pie-tui-check-{os.getpid()}")
    env = {"PIE_LOCAL_HOME": home, "TERM": "xterm-256color", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": package_env()["PYTHONPATH"]}
    try:
        yield tmux, env, home
    finally:
        tmux.kill()
        if not keep_home:
            shutil.rmtree(home, ignore_errors=True)


def check(timeout: float = 120.0, keep_home: bool = False) -> None:
    with tui_session(keep_home) as (tmux, env, home):
        tmux.start(f"{shlex.quote(sys.executable)} -m pie_local", env, cwd=home)  # not the source tree
        # No model installed: the app opens on Models and offers the starter model.
        wait_for(tmux, "Set up the starter model", 60, "start")
        tmux.keys("s")
        wait_for(tmux, "gemma3-270m is ready", timeout, "starter model")
        tmux.keys("1")
        screen = chat_once(tmux, timeout)
        quit_tui(tmux)
        print("tmux TUI check passed; last screen before quitting:\n" + screen)


@contextlib.contextmanager
def server(home: str, timeout: float) -> Iterator[dict]:
    """`pie-local serve --model gemma3-270m` in ``home`` (tests/server_helpers.py starts and stops
    it); yields its record, and fails the check if the server died while the TUI used it."""
    with serve_process(Path(home), "--model", "gemma3-270m", "--threads", "2", "--pages", "128",
                       timeout=timeout) as (record, proc):
        yield dataclasses.asdict(record)
        if proc.poll() is not None:
            raise CheckFailed(f"the server stopped with the TUI (exit {proc.returncode})")


def check_attached(timeout: float = 120.0, keep_home: bool = False) -> None:
    """A server on the starter model first; the TUI attaches to it and generates there."""
    with tui_session(keep_home) as (tmux, env, home), server(home, timeout) as record:
        tmux.start(f"{shlex.quote(sys.executable)} -m pie_local", env, cwd=home)
        address = f"127.0.0.1:{record['port']}"
        wait_for(tmux, f"server {address}", 60, "attached to the server")
        screen = chat_once(tmux, timeout)  # the server's model is there: the app opened on Sessions
        wait_for(tmux, f"server {address} · model gemma3-270m", 10, "the server's model in the status bar")
        quit_tui(tmux)
        with urllib.request.urlopen(f"{record['url']}/v1/pie/stats", timeout=10) as response:
            stats = json.load(response)
        if [m["name"] for m in stats["models"]] != ["gemma3-270m"]:
            raise CheckFailed(f"the server should hold the one model the TUI used: {stats['models']}")
        print("tmux TUI check (attached to a server) passed; last screen before quitting:\n" + screen)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for slow steps")
    parser.add_argument("--keep-home", action="store_true", help="keep the temporary data directory")
    parser.add_argument("--server", action="store_true", help="start a server first: the TUI must attach to it")
    args = parser.parse_args()
    try:
        (check_attached if args.server else check)(args.timeout, args.keep_home)
    except CheckFailed as exc:
        print(f"tmux TUI check FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
