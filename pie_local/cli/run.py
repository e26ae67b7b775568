"""Run an inferlet (a standard one by name, or your own .py file) and stream its output.

Everything after `--` goes to the inferlet as `--key value` arguments. Streamed text goes to
stdout as it is generated (nothing else does, so output can be piped); other messages go to stderr.
When a pie-local server runs (`pie-local serve`), the inferlet runs there, on the model it holds;
otherwise this command loads the model itself. --local always does; --server URL names a server.

examples:
  pie-local run --list
  pie-local run text-completion -- --prompt 'Once upon a time' --max-tokens 64
  pie-local run text-completion -- --help
  pie-local run best-of-n --model qwen2.5-0.5b -- --prompt 'Q: 12*7=' --n 8
  pie-local run react-agent --json -- --prompt 'What is 17 * 23?' --tools calculator
  pie-local run react-agent -- --prompt 'What is 2 + 40?' --mcp 'python my_mcp_server.py'
  pie-local run json-output -- --schema person.json --prompt 'Ada Lovelace, 36' --no-lenient
  pie-local run ./my_inferlet.py -- --text hello
  pie-local run text-completion -- --prompt "$(cat notes.txt)" | tee summary.txt
  pie-local run text-completion --local -- --prompt 'Hi'     # never the server
  pie-local run text-completion --gpu-layers 12 -- --prompt 'Hi'  # 12 layers on the GPU
  pie-local run text-completion --rpc 10.0.0.2:50052 -- --prompt 'Hi'  # layers on a worker too
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inferlet", nargs="?", metavar="NAME|PATH", help="standard inferlet name or path to a .py file")
    parser.add_argument("inferlet_args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                        help="the inferlet's own arguments, after `--` (`-- --help` lists them)")
    add_engine_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object (text, result, messages) at the end")
    parser.add_argument("--list", action="store_true", help="list the standard inferlets and exit")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    from pie_local.cli.devices import add_device_arguments
    from pie_local.cli.target import add_target_arguments

    parser.add_argument("--model", "-m", default=None, help="model name or .gguf path (default: the default model)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads of a model loaded here (default: auto — physical cores allowed by affinity and cgroup quota, adapted while running; a server has its own)")
    add_device_arguments(parser)
    add_target_arguments(parser)


def split_remainder(rest: list[str]) -> tuple[list[str], list[str]]:
    """(options of `run` itself, inferlet arguments) from what follows the inferlet name.

    argparse hands over everything after the name; a `--` in it separates run's own options
    (``run NAME --json -- --prompt x``) from the inferlet's.
    """
    if "--" in rest:
        at = rest.index("--")
        return rest[:at], rest[at + 1 :]
    return [], rest


def _write(text: str) -> bool:
    """Stream ``text`` to stdout; False once stdout is a closed pipe."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 — Python flushes stdout again at exit
        return False
    return True


def make_engine(args: argparse.Namespace):
    from pie_local.cli.devices import device_params
    from pie_local.driver.types import DriverParams
    from pie_local.runtime.engine import Engine, EngineConfig

    return Engine(args.model, EngineConfig(driver=DriverParams(n_threads=args.threads, **device_params(args))))


def list_inferlets(as_json: bool) -> int:
    from pie_local.present.format import label_lines
    from pie_local.runtime.inferlet import load_inferlet, stdlib_names

    specs = [load_inferlet(name) for name in stdlib_names()]
    if as_json:
        rows = [{"name": s.name, "description": s.description,
                 "parameters": {k: {"type": p.type.__name__, "required": p.required, "default": p.default,
                                    "help": p.help} for k, p in s.parameters.items()}} for s in specs]
        print(json.dumps(rows, indent=2))
        return 0
    print(label_lines((s.name, s.description) for s in specs))
    print("\n`pie-local run NAME -- --help` shows an inferlet's parameters.")
    return 0


def run(args: argparse.Namespace) -> int:
    from pie_local.present.problems import UsageError

    own, inferlet_args = split_remainder(list(args.inferlet_args or []))
    if own:
        extra = argparse.ArgumentParser(prog="pie-local run", add_help=False)
        extra.add_argument("--json", action="store_true")
        extra.add_argument("--list", action="store_true")
        add_engine_arguments(extra)
        parsed, unknown = extra.parse_known_args(own)
        if unknown:
            raise UsageError(f"unrecognized options {' '.join(unknown)}", "inferlet arguments go after `--`")
        for key, value in vars(parsed).items():
            if value not in (None, False, 0):
                setattr(args, key, value)
    if args.list:
        return list_inferlets(args.json)
    if not args.inferlet:
        raise UsageError("which inferlet? give a name or a .py path", "`pie-local run --list` shows the standard ones")

    from pie_local.runtime.inferlet import InferletError, load_inferlet

    spec = load_inferlet(args.inferlet)
    if any(a in ("--help", "-h") for a in inferlet_args):
        print(spec.usage())
        return 0
    try:
        parsed = spec.parse_args(inferlet_args)
    except InferletError as exc:
        raise UsageError(f"{exc}\n\n{spec.usage()}") from exc

    import asyncio

    return asyncio.run(_run(args, spec, parsed))


async def _run(args: argparse.Namespace, spec, parsed) -> int:
    from pie_local.cli.target import describe_failure, open_target
    from pie_local.present.problems import UserError

    async with open_target(args) as target:
        handle = await target.launch(spec, parsed)
        text: list[str] = []
        data: list[Any] = []
        async for msg in handle.messages():
            if msg.kind == "text":
                text.append(msg.data)
                if not args.json and not _write(msg.data):
                    await target.cancel(handle)  # the reader went away (`| head`): stop generating
                    return 0
            else:
                data.append(msg.data)
                if not args.json:
                    print(json.dumps(msg.data, default=str), file=sys.stderr)
        try:
            result = await handle.result()
        except Exception as exc:  # noqa: BLE001 — the inferlet's error, shown without a traceback
            if text and not args.json:
                sys.stdout.write("\n")
            raise UserError(f"inferlet {spec.name!r} failed: {describe_failure(exc)}") from exc
        if args.json:
            print(json.dumps({"inferlet": spec.name, "model": target.model_name, "text": "".join(text),
                              "result": result, "messages": data, "tokens": handle.tokens,
                              "elapsed_s": round(handle.elapsed, 3)}, default=str, ensure_ascii=False))
        elif not text and result is not None:
            print(result if isinstance(result, str) else json.dumps(result, indent=2, default=str, ensure_ascii=False))
        elif text and sys.stdout.isatty():
            sys.stdout.write("\n")
        return 0
