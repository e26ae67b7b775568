"""Small text helpers shared by the model commands (sizes, tables)."""

from __future__ import annotations

from collections.abc import Sequence


def human_size(n: int | float | None) -> str:
    """1234567 -> '1.2 MB' (decimal units, like download sizes on the hub)."""
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_count(n: int | None) -> str:
    """268098176 -> '268.1M'."""
    if n is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    table = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())

