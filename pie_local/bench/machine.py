"""The thread count both engines get by default, and what the CPU lets llama.cpp use."""

from __future__ import annotations

import os
from pathlib import Path


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


def cpu_has_amx() -> bool:
    """Whether the CPU advertises AMX (ggml's AMX weight buffer type would be used, and it crashes
    in VMs that advertise AMX without enabling it)."""
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
