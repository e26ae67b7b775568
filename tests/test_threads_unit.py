"""The thread-count controller (native/ggml_driver/src/threads.c) on its own, compiled alone and
driven through ctypes with made-up pass times: does "auto" settle on the faster count when a core
is busy, come back when it is free, and leave an idle machine at full speed?"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

NATIVE = Path(__file__).resolve().parents[1] / "native" / "ggml_driver"
STATE_BYTES = 1 << 16  # more than sizeof(pie_threads)


@pytest.fixture(scope="module")
def lib_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler to build the controller")
    out = tmp_path_factory.mktemp("threads") / "libpie_threads.so"
    subprocess.run([cc, "-std=c11", "-O2", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                    str(NATIVE / "src" / "threads.c"), "-o", str(out)], check=True)  # fmt: skip
    return out


class Controller:
    def __init__(self, path: Path, n: int, adaptive: bool = True) -> None:
        self.lib = ctypes.CDLL(str(path))
        self.lib.pie_threads_init.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_bool]
        self.lib.pie_threads_begin.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        self.lib.pie_threads_begin.restype = ctypes.c_int32
        self.lib.pie_threads_end.argtypes = [ctypes.c_void_p, ctypes.c_double]
        self.lib.pie_threads_shape_key.argtypes = [ctypes.c_int32, ctypes.c_int32]
        self.lib.pie_threads_shape_key.restype = ctypes.c_int64
        self.state = ctypes.create_string_buffer(STATE_BYTES)
        self.lib.pie_threads_init(self.state, n, adaptive)

    def run(self, passes: int, cost: Callable[[int], float], shapes: tuple[tuple[int, int], ...] = ((1, 1),)) -> list[int]:
        """Runs `passes` passes cycling through `shapes` (n_tokens, n_outputs); returns each one's threads."""
        used = []
        for i in range(passes):
            tokens, outputs = shapes[i % len(shapes)]
            n = self.lib.pie_threads_begin(self.state, self.lib.pie_threads_shape_key(tokens, outputs))
            self.lib.pie_threads_end(self.state, cost(n) * tokens)
            used.append(n)
        return used


def share(used: list[int], n: int) -> float:
    return used.count(n) / len(used)


# Two cores, measured on the starter model: 2 threads ~14 ms a token idle, ~45 ms with one core
# busy; 1 thread ~21 ms either way.
IDLE = {1: 0.021, 2: 0.014}
BUSY = {1: 0.021, 2: 0.045}


def test_idle_machine_keeps_every_thread(lib_path: Path) -> None:
    used = Controller(lib_path, 2).run(2000, IDLE.get)
    assert share(used, 2) > 0.97  # probes with one thread fewer back off to one pass in 64
    assert share(used[1000:], 2) > 0.98


def test_busy_core_drops_to_the_faster_count(lib_path: Path) -> None:
    used = Controller(lib_path, 2).run(1000, BUSY.get)
    assert share(used[50:], 1) > 0.95


def test_load_that_comes_and_goes_is_followed(lib_path: Path) -> None:
    c = Controller(lib_path, 2)
    c.run(300, IDLE.get)
    busy = c.run(400, BUSY.get)
    idle = c.run(400, IDLE.get)
    assert share(busy[40:], 1) > 0.9  # a pass 3x slower than its best triggers a probe at once
    assert share(idle[150:], 2) > 0.9  # one thread notices a free core by probing up


def test_settles_in_the_middle_of_a_bigger_machine(lib_path: Path) -> None:
    # 8 threads stall on the busy core; 7 avoid it; fewer are slower again
    cost = {n: (0.050 if n == 8 else 0.080 / n) for n in range(1, 9)}
    used = Controller(lib_path, 8).run(2000, cost.get)
    assert share(used[500:], 7) > 0.9


def test_interleaved_batch_shapes_are_timed_apart(lib_path: Path) -> None:
    # a decode step and an 8-row step alternate; each is compared only with itself
    used = Controller(lib_path, 2).run(2000, BUSY.get, shapes=((1, 1), (8, 8)))
    assert share(used[200:], 1) > 0.9
    used = Controller(lib_path, 2).run(2000, IDLE.get, shapes=((1, 1), (8, 8)))
    assert share(used, 2) > 0.97


def test_noisy_times_do_not_flap(lib_path: Path) -> None:
    import random

    rng = random.Random(3)
    used = Controller(lib_path, 2).run(3000, lambda n: IDLE[n] * rng.uniform(0.8, 1.25))
    assert share(used, 2) > 0.95


def test_explicit_count_is_kept(lib_path: Path) -> None:
    assert set(Controller(lib_path, 2, adaptive=False).run(300, BUSY.get)) == {2}
    assert set(Controller(lib_path, 1).run(300, IDLE.get)) == {1}  # nothing to adapt with one


def test_allowed_threads_follow_the_affinity_mask(lib_path: Path) -> None:
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    code = (
        "import ctypes, os, sys; lib = ctypes.CDLL(sys.argv[1]); "
        "before = lib.pie_threads_allowed(); os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
        "print(before, lib.pie_threads_allowed())"
    )
    before, pinned = map(int, subprocess.run([sys.executable, "-c", code, str(lib_path)], check=True,
                                             capture_output=True, text=True).stdout.split())  # fmt: skip
    assert pinned == 1
    assert 1 <= before <= len(os.sched_getaffinity(0))
