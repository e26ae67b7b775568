"""The thread count both engines get by default, and what the CPU lets llama.cpp use."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def physical_cores() -> int:
    """Physical cores (not hyper-threads), the thread count both engines get by default."""
    try:
        pairs = set()
        block: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            if ":" in line:
                key, _, value = line.partition(":")
                block[key.strip()] = value.strip()
            elif block:
                pairs.add((block.get("physical id"), block.get("core id")))
                block = {}
        if pairs and (None, None) not in pairs:
            return len(pairs)
    except OSError:
        pass
    return max(1, (os.cpu_count() or 2) // 2)


def threads_or_cores(n_threads: int) -> int:
    """``n_threads``, or the physical cores when it is <= 0."""
    return n_threads if n_threads > 0 else physical_cores()


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), None where that cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def _amx_usable() -> bool:
    """Whether this process may use AMX tiles: Linux grants the XTILEDATA state on request
    (arch_prctl ARCH_REQ_XCOMP_PERM), and refuses where the kernel or the hypervisor did not
    enable it, the case in which ggml's AMX buffer type faults."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0


def extra_bufts_safe() -> tuple[bool, str]:
    """Whether llama.cpp may load weights with its extra buffer types (use_extra_bufts): ggml's
    AMX buffer type is one of them where ggml was built for AMX, and it crashes on CPUs that
    advertise AMX without the OS enabling it. Safe: no AMX flag, or AMX advertised and usable.
    Returns (safe, the reason)."""
    import platform

    flags = _cpu_flags()
    if flags is None:
        x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
        return (not x86, "no AMX on this architecture" if not x86 else "CPU flags unreadable: AMX unknown")
    if not any(f.startswith("amx") for f in flags):
        return True, "the CPU advertises no AMX"
    if _amx_usable():
        return True, "the CPU advertises AMX and the OS grants it"
    return False, "the CPU advertises AMX but the OS refuses it (ggml's AMX buffer type would fault)"


def on_own_thread(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` on a thread of its own, which ends with it; its result, or its exception.

    Both engines compute through ggml with OpenMP, and libgomp keeps a pool of workers for every
    thread that has run a parallel region. Once the process holds more of them than it has CPUs,
    libgomp stops spinning at barriers and sleeps at each one, and ggml passes one barrier per
    graph node: llama.cpp run on the main thread slowed every later pie-local side (whose driver
    thread has a pool of its own) by about 30% (best-of-8, 100 -> 70 tok/s). A thread that ends
    takes its pool with it, so a side run here leaves nothing behind."""
    out: list = []

    def run() -> None:
        try:
            out.append((True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 — re-raised on the caller's thread
            out.append((False, exc))

    thread = threading.Thread(target=run, name="bench-side")
    thread.start()
    thread.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value
