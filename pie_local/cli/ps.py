"""List the inferlets running on this machine: the pie-local server's runs (every client's) and
those of every process that loaded a model itself.

Runs on the server have ids like run-3; `pie-local stop run-3` cancels one. --local leaves the
server out; --server URL asks that server.

examples:
  pie-local ps
  pie-local ps --all            # the server's finished runs too
  pie-local ps --json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pie_local.cli.target import add_target_arguments

    parser.add_argument("--json", action="store_true",
                        help='print one JSON object: {"server": ..., "runs": [...], "engines": [...]}')
    parser.add_argument("--all", action="store_true",
                        help="also list the server's finished runs (it keeps the last 256)")
    add_target_arguments(parser)


def _elapsed(row: dict, now: float) -> str:
    seconds = row.get("elapsed_s")
    if seconds is None and row.get("started_at"):
        seconds = now - float(row["started_at"])
    return "-" if seconds is None else f"{float(seconds):.1f}s"


def _server(args: argparse.Namespace) -> dict | None:
    """The server's pid, URL and runs, or None when no server is used."""
    import asyncio

    from pie_local.cli.target import server_client

    client = server_client(args)
    if client is None:
        return None

    async def fetch() -> dict:
        async with client:
            return await client.stats()

    stats = asyncio.run(fetch())
    return {"url": client.url, "pid": stats["pid"], "runs": stats["runs"]}


def _on_this_machine(url: str) -> bool:
    from urllib.parse import urlparse

    from pie_local.server.config import is_loopback

    return is_loopback(urlparse(url).hostname or "")


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """{"server": {url, pid} | None, "runs": one row per inferlet, "engines": in-process engines}."""
    from pie_local.runtime.ps_registry import LIVE_STATES, read_all

    server = _server(args)
    engines = read_all()
    runs: list[dict] = []
    if server is not None:
        if _on_this_machine(server["url"]):  # its engines publish too: its runs already say what they do
            engines = [e for e in engines if e["pid"] != server["pid"]]
        for r in server["runs"]:
            if args.all or r["state"] in LIVE_STATES:
                runs.append({"pid": server["pid"], "id": r["id"], "inferlet": r["inferlet"], "state": r["state"],
                             "tokens": r["tokens"], "pages": r["pages"], "elapsed_s": r["elapsed_s"],
                             "model": r["model"], "server": server["url"]})
    for e in engines:
        for r in e.get("inferlets", []):
            runs.append({"pid": e["pid"], "id": str(r.get("id", "-")), "inferlet": r.get("name", "-"),
                         "state": r.get("state", "-"), "tokens": r.get("tokens"), "pages": r.get("pages"),
                         "elapsed_s": r.get("elapsed_s"), "started_at": r.get("started_at"),
                         "model": e.get("model", "-"), "server": None})
    summary = None if server is None else {"url": server["url"], "pid": server["pid"]}
    return {"server": summary, "runs": runs, "engines": engines}


def run(args: argparse.Namespace) -> int:
    from pie_local.present.format import print_table

    found = collect(args)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    server, runs, engines = found["server"], found["runs"], found["engines"]
    if server is None and not engines:
        print("no pie-local engine is running")
        return 0
    now = time.time()
    table = [(str(r["pid"]), r["id"], r["inferlet"], r["state"], str(r["tokens"] if r["tokens"] is not None else "-"),
              str(r["pages"] if r["pages"] is not None else "-"), _elapsed(r, now), r["model"]) for r in runs]
    print_table(("PID", "ID", "INFERLET", "STATE", "TOKENS", "PAGES", "ELAPSED", "MODEL"), table)
    if not runs:
        where = [f"the server at {server['url']}"] if server else []
        where += [f"{len(engines)} engine(s)"] if engines else []
        print(f"({' and '.join(where)}: no inferlet running)")
    elif server is not None:
        print(f"runs on the server at {server['url']} (pid {server['pid']}): `pie-local stop ID` cancels one")
    return 0
