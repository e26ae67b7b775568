"""How numbers and tables read, in the CLI and the TUI alike.

Sizes are decimal, as the hub and disk vendors count: 1 kB = 1000 B, 1 MB = 10^6 B. A value that is
not known reads as "-".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

UNKNOWN = "-"


def human_size(n: int | float | None) -> str:
    """1234567 -> '1.2 MB'; 512 -> '512 B'."""
    if n is None:
        return UNKNOWN
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_count(n: int | None) -> str:
    """268098176 -> '268.1M' (k, M, B: thousands, millions, billions)."""
    if n is None:
        return UNKNOWN
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell, two spaces apart."""
    table = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


def label_lines(pairs: Iterable[tuple[str, str]]) -> str:
    """'label  value' lines with the values aligned after the longest label."""
    pairs = list(pairs)
    width = max((len(label) for label, _ in pairs), default=0)
    return "\n".join(f"{label.ljust(width)}  {value}".rstrip() for label, value in pairs)
