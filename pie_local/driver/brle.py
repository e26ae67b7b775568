"""BRLE attention masks, the wire format of custom masks between the runtime and the driver.

A mask is a list of run lengths over a request's KV indices, alternating hidden and visible and
starting with a *hidden* run (a leading 0 when the first index is visible). Visible = attend.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def encode(visible: Sequence[bool] | np.ndarray) -> list[int]:
    """A visibility vector over KV indices as BRLE runs."""
    visible = np.asarray(visible, dtype=bool)
    runs: list[int] = []
    current, count = False, 0  # runs start with a hidden run
    for v in visible:
        if v == current:
            count += 1
        else:
            runs.append(count)
            current, count = bool(v), 1
    runs.append(count)
    return runs


def decode(runs: Sequence[int] | np.ndarray, length: int) -> np.ndarray:
    """bool [length]: which KV indices the runs make visible (indices past the runs stay hidden)."""
    visible = np.zeros(length, dtype=bool)
    pos, hidden = 0, True
    for run in runs:
        run = int(run)
        if not hidden:
            visible[pos : pos + run] = True
        pos += run
        hidden = not hidden
    return visible


def truncate(runs: Sequence[int], length: int) -> list[int]:
    """The same mask over only the first ``length`` KV indices (runs then sum to ``length``)."""
    out, total = [], 0
    for run in runs:
        run = min(int(run), length - total)
        out.append(run)
        total += run
        if total == length:
            break
    return out
