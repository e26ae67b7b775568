"""List the inferlets running in every pie-local process on this machine.

examples:
  pie-local ps
  pie-local ps --json
"""

from __future__ import annotations

import argparse
import json
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object per process, as a list")


def _elapsed(row: dict, now: float) -> str:
    started = row.get("started_at")
    seconds = row.get("elapsed_s")
    if seconds is None and started:
        seconds = now - float(started)
    return "-" if seconds is None else f"{float(seconds):.1f}s"


def run(args: argparse.Namespace) -> int:
    from pie_local.present.format import print_table
    from pie_local.runtime.ps_registry import read_all

    processes = read_all()
    if args.json:
        print(json.dumps(processes, indent=2))
        return 0
    rows = [(p, row) for p in processes for row in p.get("inferlets", [])]
    if not processes:
        print("no pie-local engine is running")
        return 0
    now = time.time()
    table = [
        (
            str(process["pid"]),
            str(row.get("id", "-")),
            str(row.get("name", "-")),
            str(row.get("state", "-")),
            str(row.get("tokens", "-")),
            str(row.get("pages", "-")),
            _elapsed(row, now),
            process.get("model", "-"),
        )
        for process, row in rows
    ]
    print_table(("PID", "ID", "INFERLET", "STATE", "TOKENS", "PAGES", "ELAPSED", "MODEL"), table)
    if not rows:
        print(f"({len(processes)} engine process(es), no inferlet running)")
    return 0
