"""Remove an installed model: deletes what pie-local downloaded, never a file it only references.

Files added in place (`pie-local add`) or reused from the Hugging Face cache stay on disk, and
so does a file that another installed name still uses. Asks for confirmation unless --yes.

examples:
  pie-local rm qwen2.5-0.5b
  pie-local rm bartowski/Llama-3.2-3B-Instruct-GGUF:Q4_K_M --yes
  pie-local rm my-finetune --yes --json
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME")
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    parser.add_argument("--json", action="store_true", help="print what was deleted and kept as JSON")


def run(args: argparse.Namespace) -> int:
    from pie_local.present.format import human_size
    from pie_local.models.store import get, not_installed, remove
    from pie_local.present.problems import UserError

    model = get(args.name)
    if model is None:
        raise not_installed(args.name)
    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError(f"not removing '{args.name}' without confirmation", "pass --yes")
        action = f"delete {human_size(model.size)}" if model.owned else "forget it (its file stays)"
        answer = input(f"remove {model.name} ({action})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("kept", file=sys.stderr)
            return 1
    removal = remove(args.name)
    if args.json:
        print(
            json.dumps(
                {
                    "name": removal.model.name,
                    "deleted": [str(p) for p in removal.deleted],
                    "kept": [str(p) for p in removal.kept],
                },
                indent=2,
            )
        )
        return 0
    print(f"removed {removal.model.name}")
    for path in removal.deleted:
        print(f"  deleted {path}")
    for path in removal.kept:
        print(f"  kept    {path} (not pie-local's download, or still used by another name)")
    return 0
