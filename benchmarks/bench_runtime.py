"""Issue-3 runtime benchmark: agent-shaped workloads on pie-local vs llama-cpp-python.

Same GGUF, same thread count, one run. Workloads: best-of-8 from a shared 512-token prompt,
8 concurrent chats, tree-of-thought (depth 2, breadth 3), a tool loop of 4 calls; plus the
runtime's overhead per decode step against a bare driver loop. The core is `pie_local.bench`
(also behind `pie-local bench`).

    python benchmarks/bench_runtime.py [--model NAME|PATH] [--threads N] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from pie_local.bench import BenchConfig, format_runtime_report, run_runtime_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model name or .gguf path (default: the default model)")
    parser.add_argument("--threads", type=int, default=0, help="threads for both engines (default: physical cores)")
    parser.add_argument("--quick", action="store_true", help="shorter prompts and generations (a smoke run)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    make = BenchConfig.quick if args.quick else BenchConfig
    cfg = make(model=args.model, n_threads=args.threads)
    report = run_runtime_bench(cfg, progress=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2) if args.json else format_runtime_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
