"""A watchdog for the engine's event loop.

Every inferlet shares one event loop; an inferlet that runs blocking code (a sync HTTP call,
`time.sleep`, a long computation) stops every other inferlet and the scheduler with it. The
watchdog notices: the loop bumps a heartbeat a few times a second; a thread checks it, and when
the loop has not turned for ``threshold`` seconds it looks at the loop thread's stack, finds the
inferlet whose ``main`` is on it, and reports it (log warning, `Engine.stats().stall`).

The fix for the inferlet: ``await rt.run_blocking(fn, *args)`` (or make its tools plain
functions: sync tools already run in a worker thread).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Callable, Iterable

log = logging.getLogger("pie_local.runtime")

HEARTBEAT_S = 0.1


@dataclass(frozen=True)
class Stall:
    """The loop is (or was last) blocked: by which inferlet, where, since when."""

    inferlet_id: int | None  # None: blocked outside any inferlet's code
    inferlet: str  # its name, or "" when unknown
    where: str  # file:line of the innermost frame of the blocking code
    since: float  # time.monotonic() of the last heartbeat before the stall
    ended: float | None = None  # when the loop turned again

    def describe(self) -> str:
        seconds = (self.ended or time.monotonic()) - self.since
        who = f"inferlet {self.inferlet!r} ({self.inferlet_id})" if self.inferlet_id is not None else "non-inferlet code"
        return f"event loop blocked for {seconds:.1f} s by {who} at {self.where}"


class LoopWatchdog:
    def __init__(self, running: Callable[[], Iterable], threshold: float = 1.0) -> None:
        """``running()`` gives the running InferletHandles (their spec.main identifies their frames)."""
        self.threshold = threshold
        self.stall: Stall | None = None  # the stall in progress
        self.last_stall: Stall | None = None  # the most recent one, kept after the loop recovers
        self._running = running
        self._beat = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._heartbeat()
        self._thread = threading.Thread(target=self._watch, name="pie-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._thread is not None:
            self._thread.join()

    def _heartbeat(self) -> None:
        self._beat = time.monotonic()
        if self.stall is not None:
            self.last_stall = dataclasses.replace(self.stall, ended=self._beat)
            self.stall = None
            log.warning("%s; the loop runs again", self.last_stall.describe())
        self._timer = self._loop.call_later(HEARTBEAT_S, self._heartbeat)

    def _watch(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            beat = self._beat
            if self.stall is None and time.monotonic() - beat > self.threshold:
                stall = self._find_culprit(beat)
                if self._beat == beat:  # still blocked after the look at its stack
                    self.stall = self.last_stall = stall
                    log.warning("%s: run blocking code with `await rt.run_blocking(fn, ...)`", stall.describe())

    def _find_culprit(self, since: float) -> Stall:
        frame = sys._current_frames().get(self._loop_thread)
        if frame is None:
            return Stall(None, "", "?", since)
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        mains = {}
        for handle in list(self._running()):
            code = getattr(handle.spec.main, "__code__", None)
            if code is not None:
                mains.setdefault(code, []).append(handle)
        for f in _outward(frame):
            handles = mains.get(f.f_code)
            if handles:
                first_arg = f.f_code.co_varnames[0] if f.f_code.co_argcount else None
                rt = f.f_locals.get(first_arg) if len(handles) > 1 and first_arg else None
                handle = next((h for h in handles if rt is not None and getattr(rt, "handle", None) is h),
                              handles[0])
                return Stall(handle.id, handle.name, where, since)
        return Stall(None, "", where, since)


def _outward(frame: FrameType | None) -> Iterable[FrameType]:
    while frame is not None:
        yield frame
        frame = frame.f_back
