"""Use a GGUF that is already on disk, in place (no copy; `rm` never deletes it).

The name defaults to the file name without `.gguf`. Any part of a split GGUF adds the whole model.
A file in the Hugging Face cache can be added by its hub name OWNER/REPO/FILE.gguf (and
`pie-local pull` also finds files there instead of downloading them again).

examples:
  pie-local add ~/models/Llama-3.2-1B-Instruct-Q4_K_M.gguf
  pie-local add ./my-finetune-q8_0.gguf --name my-finetune --default
  pie-local add big-model-00001-of-00003.gguf --json
  pie-local add bartowski/Llama-3.2-1B-Instruct-GGUF/Llama-3.2-1B-Instruct-Q4_K_M.gguf
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH.gguf")
    parser.add_argument("--name", help="the name to use it by (default: the file name)")
    parser.add_argument("--default", action="store_true", help="also make it the default model")
    parser.add_argument("--json", action="store_true", help="print the added model as JSON")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pie_local.present.format import human_size
    from pie_local.models.pull import locate_in_hf_cache
    from pie_local.models.store import add, set_default_model

    path = Path(args.path).expanduser()
    if not path.exists():  # OWNER/REPO/FILE.gguf already downloaded by another tool
        path = locate_in_hf_cache(args.path) or path
    model = add(path, name=args.name)
    if args.default:
        set_default_model(model.name)
    if args.json:
        print(json.dumps(model.to_json(), indent=2))
    else:
        print(f"added {model.name}: {human_size(model.size)}, {model.arch} {model.quant or ''}".rstrip())
        print(f"  used in place at {model.path}")
    return 0
