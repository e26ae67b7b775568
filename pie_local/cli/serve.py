"""Serve models over HTTP: an OpenAI-compatible API and the inferlet (program) API.

One process owns the models: a model loads on its first request (or at start with --model),
stays while used and unloads after --keep-alive; --max-models bounds how many stay loaded.
Local clients find the server through the data directory. Binding anything but loopback needs
an API key. Routes and examples: docs/SERVER.md.

examples:
  pie-local serve
  pie-local serve --model gemma3-270m --keep-alive 30m
  pie-local serve --port 9000 --max-models 2 --threads 8
  pie-local serve --model qwen2.5-0.5b --rpc 10.0.0.2:50052,10.0.0.3:50052   # layers on two workers
  PIE_LOCAL_API_KEY=secret pie-local serve --host 0.0.0.0
  curl http://127.0.0.1:8471/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "gemma3-270m", "messages": [{"role": "user", "content": "Hi"}]}'
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from pie_local.cli.devices import add_device_arguments, device_params
from pie_local.server.config import DEFAULT_PORT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT}; 0 = any free port)")
    parser.add_argument("--model", "-m", action="append", default=[], metavar="NAME",
                        help="load this model at start (repeat for several)")
    parser.add_argument("--api-key", default=None,
                        help="require `Authorization: Bearer KEY` (or set PIE_LOCAL_API_KEY, or use --api-key-file)")
    parser.add_argument("--api-key-file", default=None, metavar="PATH", help="read the API key from this file")
    parser.add_argument("--keep-alive", default="10m",
                        help="unload a model after it was idle this long (30s, 10m, 1h, 0, never; default 10m)")
    parser.add_argument("--max-models", type=int, default=1, help="models loaded at once (default 1)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per model (default: auto — physical cores allowed by affinity and cgroup quota, adapted under load)")
    parser.add_argument("--pages", type=int, default=512, help="KV pages per model, 32 tokens each (default 512)")
    add_device_arguments(parser)
    parser.add_argument("--max-body", default="8MiB", help="largest request body (default 8MiB)")
    parser.add_argument("--max-connections", type=int, default=64,
                        help="concurrent connections; more are refused with 503 (default 64)")
    parser.add_argument("--no-inferlet-files", action="store_true",
                        help="refuse to run inferlet files, even for local clients (standard inferlets only)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def _api_key(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(key, the file it came from)."""
    if args.api_key_file:
        with open(os.path.expanduser(args.api_key_file), encoding="utf-8") as f:
            key = f.read().strip()
        if not key:
            raise ValueError(f"{args.api_key_file} is empty")
        return key, os.path.abspath(os.path.expanduser(args.api_key_file))
    return args.api_key or os.environ.get("PIE_LOCAL_API_KEY") or None, None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.set_inheritable(True)
    return sock


def _check_models(names: list[str]) -> None:
    """Say now, not in a traceback from startup, when a --model is not installed (ModelError)."""
    from pie_local.models import resolve_model

    for name in names:
        resolve_model(name)


def _exposure(host: str, port: int, inferlet_files: bool) -> str:
    return (f"pie-local serve: listening on {host}:{port}, beyond this machine. Anyone who can reach it and has "
            "the API key can:\n"
            "  - generate with every installed model (/v1/chat/completions, /v1/completions, /v1/models)\n"
            "  - run the standard inferlets, message and cancel them, see every run (/v1/pie/...)\n"
            "  - load any installed model into memory\n"
            + ("Inferlet files (Python with this server's permissions) run only for clients on this machine.\n"
               if inferlet_files else "Inferlet files are disabled (--no-inferlet-files).\n"))


def run(args: argparse.Namespace) -> int:
    import logging

    from pie_local import __version__
    from pie_local.present.problems import UsageError, UserError
    from pie_local.server import record
    from pie_local.server.config import ServerConfig, is_loopback, parse_duration, parse_size

    try:
        key, key_file = _api_key(args)
        config = ServerConfig(host=args.host, port=args.port, api_key=key, keep_alive_s=parse_duration(args.keep_alive),
                              max_models=args.max_models, models=list(args.model), threads=args.threads,
                              n_pages=args.pages, max_body_bytes=parse_size(args.max_body),
                              max_connections=args.max_connections, inferlet_files=not args.no_inferlet_files,
                              **device_params(args))
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if config.max_models < 1 or config.n_pages < 1 or config.max_connections < 1:
        raise UsageError("--max-models, --pages and --max-connections must be >= 1")
    if not config.loopback and not config.api_key:
        raise UsageError(f"--host {args.host} exposes the server beyond this machine without an API key",
                         "give one with --api-key, --api-key-file or PIE_LOCAL_API_KEY")
    _check_models(config.models)
    existing = record.find_server()
    if existing is not None:
        raise UserError(f"a pie-local server already runs at {existing.url} (pid {existing.pid})",
                        "use it, or stop it first")
    try:
        sock = _bind(config.host, config.port)
    except OSError as exc:
        raise UserError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
                        "choose another --port (0 = any free one)") from None
    config.port = sock.getsockname()[1]
    url_host = "127.0.0.1" if config.host in ("0.0.0.0", "") else ("[::1]" if config.host == "::" else config.host)
    if ":" in url_host and not url_host.startswith("["):
        url_host = f"[{url_host}]"
    url = f"http://{url_host}:{config.port}"
    if not config.loopback:
        print(_exposure(config.host, config.port, config.inferlet_files), file=sys.stderr)

    # the server's own lines at --log-level; the layers below (llama.cpp's loader...) only when debugging
    logging.basicConfig(level="DEBUG" if args.log_level == "debug" else "WARNING",
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("pie_local.server").setLevel(args.log_level.upper())

    def on_ready() -> None:
        record.write(record.ServerRecord(pid=os.getpid(), host=config.host, port=config.port, url=url,
                                         version=__version__, api_key_required=bool(config.api_key),
                                         api_key_file=key_file, models=list(config.models)))
        print(f"pie-local serve: listening on {url} (OpenAI API at {url}/v1)", flush=True)

    return _serve(config, sock, on_ready, record.remove, args.log_level)


def _serve(config, sock: socket.socket, on_ready, on_stop, log_level: str) -> int:
    import uvicorn

    from pie_local.server.app import create_app

    app = create_app(config, on_ready=on_ready, on_stop=on_stop)
    # uvicorn's own info lines repeat what on_ready prints: it logs from "warning" up unless debugging
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="debug" if log_level == "debug" else "warning",
                                           access_log=log_level == "debug", limit_concurrency=config.max_connections,
                                           timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        on_stop()
        sock.close()
    return 0 if server.started else 1
