"""Real-world JSON schemas (JSONSchemaBench, 600 in tests/data/jsonschemabench): compile rate under
JsonSchema's defaults, validity and repeated keys of the outputs on a seeded subset, mask cost per
token. The core is `pie_local.bench.schemas` (also behind tests/test_jsonschemabench.py).

    python benchmarks/bench_schemas.py [--per-collection N] [--max-tokens N] [--random] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from pie_local.bench.schemas import compile_cases, format_report, generate, load_cases, random_outputs, sample, summarize

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "jsonschemabench" / "schemas.jsonl"


async def model_outputs(args: argparse.Namespace, picked: list) -> list:
    from pie_local.driver.types import DriverParams
    from pie_local.runtime.engine import Engine, EngineConfig

    async with Engine(args.model, EngineConfig(driver=DriverParams(n_threads=args.threads))) as engine:
        return await generate(engine, picked, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="schemas, one JSON object a line")
    parser.add_argument("--per-collection", type=int, default=10, help="schemas generated for, per collection")
    parser.add_argument("--max-tokens", type=int, default=192, help="tokens per output at most")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0, help="picks the subset and seeds sampling")
    parser.add_argument("--random", action="store_true",
                        help="an adversarial token chooser instead of the model (no driver needed)")
    parser.add_argument("--model", default=None, help="model name or .gguf path (default: the default model)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: physical cores)")
    parser.add_argument("--strict", action="store_true", help="compile with lenient=False, coerce_one_of=False")
    parser.add_argument("--repeated-keys", action="store_true",
                        help="unique_keys=False: the grammar alone (to see what the key check costs)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)

    options = {"lenient": False, "coerce_one_of": False} if args.strict else {}
    if args.repeated_keys:
        options["unique_keys"] = False
    compiled = compile_cases(load_cases(args.data), **options)
    picked = sample(compiled, args.per_collection, args.seed)
    if args.random:
        from pie_local.models import resolve_model
        from pie_local.models.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_gguf(resolve_model(args.model).path)
        outputs = random_outputs(picked, tokenizer, max_tokens=args.max_tokens, seed=args.seed)
    else:
        outputs = asyncio.run(model_outputs(args, picked))
    report = summarize(compiled, outputs)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
