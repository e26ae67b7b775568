"""Cancel runs on the pie-local server, whichever client started them (ids from `pie-local ps`).

A run of a command that loaded the model itself (no server, or --local) stops with Ctrl-C in
its own terminal.

examples:
  pie-local ps
  pie-local stop run-3
  pie-local stop run-3 run-4 --server http://127.0.0.1:8471
"""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a run id, as `pie-local ps` lists it (run-N)")
    parser.add_argument("--server", metavar="URL", default=None,
                        help="the pie-local server at URL (default: the local server)")


def run(args: argparse.Namespace) -> int:
    import asyncio

    from pie_local.present.problems import UserError
    from pie_local.server.client import Client

    client = Client(args.server) if args.server else Client.find()
    if client is None:
        raise UserError("no pie-local server is running, so there is no run to stop",
                        "a command that loaded the model itself stops with Ctrl-C in its terminal")
    return asyncio.run(_stop(client, args.runs))


async def _stop(client: Any, run_ids: list[str]) -> int:
    from pie_local.cli.target import LIVE

    async with client:
        for run_id in run_ids:
            state = (await client.get(run_id)).state  # an unknown id is a 404 here
            if state in LIVE:
                state = (await client.cancel(run_id))["state"]
                if state == "cancelled":
                    print(f"{run_id}: cancelled")
                    continue
            print(f"{run_id}: had already ended ({state})")
    return 0
