"""Show a model's GGUF metadata and the memory it needs for weights + KV cache at a context.

NAME is an installed name, the starter model, or a path to a .gguf file. The estimate is
weights plus K/V for every layer at --context tokens (default: the model's trained context);
compute buffers come on top.

examples:
  pie-local show gemma3-270m
  pie-local show qwen2.5-0.5b --context 8192
  pie-local show ./model.gguf --json --context 4096 --kv-type q8_0
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME|PATH.gguf")
    parser.add_argument("--context", type=int, help="context length for the KV estimate (default: the model's)")
    parser.add_argument("--kv-type", default="f16", choices=["f16", "q8_0", "f32"], help="KV cache type (default f16)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from pie_local.present.card import read_model_card
    from pie_local.present.problems import UsageError

    if args.context is not None and args.context <= 0:
        raise UsageError(f"--context must be a positive number of tokens, got {args.context}")
    card = read_model_card(args.name, args.context, args.kv_type)
    print(json.dumps(card.data, indent=2) if args.json else card.text())
    return 0
