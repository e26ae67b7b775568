"""List installed models (name, quant, size, architecture, where the file lives).

The starter model (gemma3-270m) is always listed: it ships with pie-local and is assembled on
first use, without a download. `--catalog` lists the models pie-local knows how to pull;
VERIFIED "no" means the entry's hub repo and quant names have not been confirmed by a pull yet
(the first successful pull confirms them).

examples:
  pie-local list
  pie-local list --json
  pie-local list --catalog
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--catalog", action="store_true", help="list the catalogue (models.toml) instead")
    parser.add_argument("--json", action="store_true", help="print a JSON list")


def _status(model) -> str:
    if model.present:
        return "ready"
    if model.source == "package":
        return "available (assembled on first use)"
    return "MISSING FILES"


def run(args: argparse.Namespace) -> int:
    from pie_local.present.format import human_size, print_table
    from pie_local.models.registry import is_verified, load_registry, pulled_entries
    from pie_local.models.store import STARTER_NAME, default_model_name, list_installed

    installed = list_installed()
    catalog = load_registry() if args.catalog else []
    default = default_model_name() or STARTER_NAME

    if args.catalog:
        have = {m.name.split(":")[0] for m in installed if m.present}
        pulled = pulled_entries()
        verified = {e.name for e in catalog if is_verified(e, pulled)}
        if args.json:
            print(json.dumps([dict(e.to_json(), installed=e.name in have, verified=e.name in verified)
                              for e in catalog], indent=2))
            return 0
        rows = [
            (
                e.name + (" *" if e.name in have else ""),
                e.params or "-",
                e.arch,
                f"{e.context_length // 1024}k" if e.context_length >= 1024 else str(e.context_length),
                ",".join(e.quants),
                "yes" if e.name in verified else "no",
                e.license,
                e.description,
            )
            for e in catalog
        ]
        print_table(("NAME", "PARAMS", "ARCH", "CTX", "QUANTS", "VERIFIED", "LICENSE", "DESCRIPTION"), rows)
        print("\n* installed.  VERIFIED no: hub names not yet confirmed by a pull.  pie-local pull NAME[:QUANT]")
        return 0

    if args.json:
        print(
            json.dumps([dict(m.to_json(), default=m.name == default, status=_status(m)) for m in installed], indent=2)
        )
        return 0
    rows = [
        (
            m.name + (" (default)" if m.name == default else ""),
            m.quant or "-",
            human_size(m.size),
            m.arch or "-",
            _status(m),
            str(m.path) + ("" if m.owned else "  [referenced]"),
        )
        for m in installed
    ]
    print_table(("NAME", "QUANT", "SIZE", "ARCH", "STATUS", "PATH"), rows)
    return 0
