"""Generation features on pie-local alone: forced tokens in one pass (json-output on a schema with
long fixed keys, fast-forward off and on). The core is `pie_local.bench.generation`.

    python benchmarks/bench_generation.py [--model NAME|PATH] [--threads N] [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from pie_local.bench.generation import format_generation_report, run_generation_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model name or .gguf path (default: the default model)")
    parser.add_argument("--threads", type=int, default=0, help="threads (default: physical cores)")
    parser.add_argument("--runs", type=int, default=3, help="runs per setting; the best is reported")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = run_generation_bench(args.model, args.threads, args.runs,
                                  progress=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2) if args.json else format_generation_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
