"""Show a model's GGUF metadata and the memory it needs for weights + KV cache at a context.

NAME is an installed name, the starter model, or a path to a .gguf file. The estimate is
weights plus K/V for every layer at --context tokens (default: the model's trained context);
compute buffers come on top. The placement lists which device would hold which layers with
the device options given (--gpu-layers, --rpc, --tensor-split), and their memory, without
loading the model.

examples:
  pie-local show gemma3-270m
  pie-local show qwen2.5-0.5b --context 8192
  pie-local show ./model.gguf --json --context 4096 --kv-type q8_0
  pie-local show qwen2.5-0.5b --gpu-layers 12 --rpc 10.0.0.2:50052
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME|PATH.gguf")
    parser.add_argument("--context", type=int, help="context length for the KV estimate (default: the model's)")
    parser.add_argument("--kv-type", default="f16", choices=["f16", "q8_0", "f32"], help="KV cache type (default f16)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    from pie_local.cli.devices import add_device_arguments

    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pie_local.present.card import read_model_card
    from pie_local.present.problems import UsageError

    if args.context is not None and args.context <= 0:
        raise UsageError(f"--context must be a positive number of tokens, got {args.context}")
    card = read_model_card(args.name, args.context, args.kv_type)
    devices, problem = _placement(args, card.data["memory"]["context"])
    if args.json:
        from pie_local.cli.devices import placement_rows

        data = dict(card.data, placement=placement_rows(devices) if devices else {"unavailable": problem})
        print(json.dumps(data, indent=2))
        return 0
    from pie_local.cli.devices import placement_lines

    print(card.text())
    print("\nplacement" + (f": unavailable ({problem})" if problem else ""))
    for line in placement_lines(devices):
        print("  " + line)
    return 0


def _placement(args: argparse.Namespace, context: int) -> tuple[list, str]:
    """(where each part would go, "") or ([], why not), from the metadata alone."""
    from pie_local.cli.devices import device_params
    from pie_local.driver import DriverError, DriverParams
    from pie_local.driver._lib import DriverNotFound
    from pie_local.driver.driver import plan_devices
    from pie_local.models import resolve_model
    from pie_local.present.problems import UsageError

    if args.kv_type not in ("f16", "q8_0"):
        return [], f"the driver keeps KV as f16 or q8_0, not {args.kv_type}"
    page = DriverParams().page_size
    params = DriverParams(page_size=page, n_pages=-(-context // page), kv_type=args.kv_type, **device_params(args))
    try:
        return plan_devices(resolve_model(args.name).path, params), ""
    except DriverError as exc:
        if exc.status == "invalid_argument":  # the options themselves are wrong
            raise UsageError(exc.message) from None
        return [], str(exc)
    except DriverNotFound as exc:
        return [], str(exc).splitlines()[0]
