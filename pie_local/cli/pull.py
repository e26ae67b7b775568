"""Download a model from the Hugging Face hub (resumable, sha256-verified).

A spec is a catalogue name (see `pie-local list --catalog`) with an optional quantization, a hub
repo with a quantization (the file is picked from the repo listing), or one file of a repo.
Interrupted pulls resume where they stopped: run the same command again. Honours HF_TOKEN
(gated models), HF_ENDPOINT (mirrors) and HF_HUB_OFFLINE.

examples:
  pie-local pull qwen2.5-0.5b
  pie-local pull llama3.2-1b:Q8_0
  pie-local pull bartowski/Llama-3.2-3B-Instruct-GGUF:Q4_K_M
  pie-local pull Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q8_0.gguf
  HF_TOKEN=hf_... pie-local pull google-owned/gated-GGUF:Q4_K_M --default
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="NAME[:QUANT] | OWNER/REPO:QUANT | OWNER/REPO/FILE.gguf")
    parser.add_argument("--default", action="store_true", help="also make it the default model")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the installed model as JSON")


class _Bar:
    """A rich progress bar on stderr with size, speed and ETA, fed by PullProgress events."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.task = None

    def __call__(self, p) -> None:
        if p.phase == "resolving":
            self.progress.console.print(f"resolving {p.name} ...")
            return
        if p.phase == "waiting" and self.task is None:
            self.progress.console.print("waiting for another pull of the same file ...")
        if p.total_bytes and self.task is None:
            self.progress.start()
            self.task = self.progress.add_task(p.name, total=p.total_bytes)
        if self.task is not None:
            label = p.filename or p.name
            if p.file_count > 1:
                label = f"[{p.file_index + 1}/{p.file_count}] {label}"
            self.progress.update(self.task, completed=p.done_bytes, description=label[-48:])

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()


def run(args: argparse.Namespace) -> int:
    from pie_local.present.format import human_size
    from pie_local.models.pull import pull
    from pie_local.models.store import set_default_model

    bar = None if args.quiet or args.json or not sys.stderr.isatty() else _Bar()
    try:
        try:
            model = pull(args.spec, progress=bar)
        finally:
            if bar is not None:
                bar.close()  # before any message, so it does not land inside the bar
    except KeyboardInterrupt:
        print("interrupted: the partial download is kept; run the same command to resume", file=sys.stderr)
        return 130
    if args.default:
        set_default_model(model.name)
    if args.json:
        print(json.dumps(model.to_json(), indent=2))
    else:
        where = "referenced in place" if not model.owned else "stored"
        print(f"{model.name}: {human_size(model.size)}, {model.arch or '?'} {model.quant or ''}".rstrip())
        print(f"  {where} at {model.path}")
        if args.default:
            print("  now the default model")
    return 0
