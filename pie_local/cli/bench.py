"""Benchmark pie-local against llama-cpp-python on this machine (same GGUF, same threads).

Runs the driver benchmark (prefill, decode, 8 batched streams) and the runtime benchmark
(best-of-8 from a shared 512-token prompt, 8 concurrent chats, tree-of-thought, a tool loop, and
the runtime's overhead per decode step), then prints times and pie/llama.cpp ratios. Takes a few
minutes on a laptop CPU; --quick runs a short version.

examples:
  pie-local bench --quick
  pie-local bench --json > bench.json
  pie-local bench --model qwen2.5-0.5b --threads 8 --only runtime
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None, help="model name or .gguf path (default: the default model)")
    parser.add_argument("--threads", type=int, default=0, help="threads for both engines (default: physical cores)")
    parser.add_argument("--quick", action="store_true", help="shorter prompts and generations (about a minute)")
    parser.add_argument("--only", choices=("driver", "runtime"), default=None, help="run only one of the benchmarks")
    parser.add_argument("--rounds", type=int, default=1,
                        help="driver benchmark rounds, the engines' order alternating (default 1; a comparison "
                             "on a noisy machine wants 5 or more)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with every number")


def run(args: argparse.Namespace) -> int:
    from pie_local.bench import BenchConfig, format_runtime_report, physical_cores, run_driver_bench, run_runtime_bench
    from pie_local.bench.report import format_driver_table

    threads = args.threads if args.threads > 0 else physical_cores()

    def progress(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    report: dict = {}
    if args.only in (None, "driver"):
        from pie_local.models import resolve_model

        progress("driver benchmark")
        sizes = dict(prefill=128, decode=32, streams=8, stream_tokens=16) if args.quick else {}
        report["driver"] = run_driver_bench(resolve_model(args.model).path, threads=threads,
                                            rounds=max(1, args.rounds), **sizes)
        if not args.json:
            print(format_driver_table(report["driver"]), flush=True)
    if args.only in (None, "runtime"):
        make = BenchConfig.quick if args.quick else BenchConfig
        report["runtime"] = run_runtime_bench(make(model=args.model, n_threads=threads), progress)
        if not args.json:
            print(("\n" if "driver" in report else "") + format_runtime_report(report["runtime"]))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0
