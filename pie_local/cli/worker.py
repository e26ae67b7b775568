"""Serve this machine's devices to pie-local (or llama.cpp) on other machines, over ggml's RPC protocol.

A model loaded elsewhere with `--rpc HOST:PORT` puts some of its layers here: their weights and
KV live in this machine's memory (its GPUs when it has any, else its CPU) and their part of each
forward pass runs here. One client at a time. It listens on 127.0.0.1 unless --host says
otherwise, and another address needs --allow-remote: ggml's RPC protocol has NO authentication
and no encryption, so anyone who reaches the port can use this machine's devices and memory.
Use it only inside a network you trust (or over an SSH tunnel). Ctrl-C stops it. docs/DEVICES.md.

examples:
  pie-local worker                                    # 127.0.0.1:50052, for a tunnel or this machine
  pie-local worker --host 10.0.0.2 --allow-remote     # reachable from the LAN: trusted networks only
  pie-local worker --port 50053 --threads 8
"""

from __future__ import annotations

import argparse
import signal
import sys

DEFAULT_PORT = 50052


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for the layers run here (default: all cores)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a --host other than loopback (the protocol has no authentication)")


def run(args: argparse.Namespace) -> int:
    from pie_local.driver import DriverError, rpc
    from pie_local.present.problems import UsageError, UserError
    from pie_local.server.config import is_loopback

    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    if not is_loopback(args.host) and not args.allow_remote:
        raise UsageError(f"--host {args.host} would let anyone who reaches it use this machine: ggml's RPC protocol "
                         "has no authentication", "add --allow-remote on a network you trust, or tunnel to 127.0.0.1")
    if not rpc.available():
        raise UserError("this ggml has no RPC backend", rpc.INSTALL_HINT)
    if not is_loopback(args.host):
        print(f"pie-local worker: WARNING: listening on {args.host}: ggml's RPC protocol has no authentication or "
              "encryption; anyone who reaches this port can use this machine's devices", file=sys.stderr)
    if args.threads <= 0:
        from pie_local.bench.machine import physical_cores

        args.threads = physical_cores()
    endpoint = f"{args.host}:{args.port}"
    print(f"pie-local worker: serving at {endpoint} (ggml RPC protocol {rpc.protocol_version()}, "
          f"{args.threads} CPU threads); Ctrl-C stops it", file=sys.stderr, flush=True)
    # the C call does not return: let Ctrl-C end the process instead of waiting for Python
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        rpc.serve(endpoint, args.threads)
    except DriverError as exc:
        raise UserError(f"the worker cannot serve at {endpoint}: {exc.message}") from None
    return 1
