"""Best-of-n from one shared prompt, pie-local (forks batched) against llama-cpp-python (one
completion per branch, as its users write it), with llama-cpp-python's default sampling and
with temperature + top-p over the whole vocabulary (issue 11). See pie_local/bench/fork.py.

    python benchmarks/bench_fork.py                                  # best-of-8, 512-token prompt, 128 tokens, 5 rounds
    python benchmarks/bench_fork.py --tokens 32 --rounds 7 --json
    python benchmarks/bench_fork.py --rounds 1 --tokens 4 --prompt-tokens 64 --sampling top_p   # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys

from pie_local.bench.fork import SAMPLINGS, format_fork_report, run_fork_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name or .gguf path (default: the default model)")
    parser.add_argument("--threads", type=int, default=0, help="threads for both sides (default: physical cores)")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="shared prompt size (default 512)")
    parser.add_argument("--n", type=int, default=8, help="branches (default 8)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per branch (default 128)")
    parser.add_argument("--sampling", choices=sorted(SAMPLINGS), action="append",
                        help="sampling to run (repeatable; default: both)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, the sides' order alternating (default 5)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if min(args.prompt_tokens, args.n, args.tokens, args.rounds) < 1:
        parser.error("every count must be >= 1")
    if args.prompt_tokens > 512:
        parser.error("--prompt-tokens is at most 512 (one prefill pass on both sides)")
    report = run_fork_bench(args.model, threads=args.threads, prompt_tokens=args.prompt_tokens, n=args.n,
                            tokens=args.tokens, samplings=tuple(args.sampling or SAMPLINGS), rounds=args.rounds)
    print(json.dumps(report, indent=2) if args.json else format_fork_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
