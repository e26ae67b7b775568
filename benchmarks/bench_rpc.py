"""What RPC workers cost: the same model local and with its layers on two `pie-local worker`
processes on loopback (prefill and decode tok/s, same threads, greedy tokens).

Loopback has no network latency to speak of, so the difference is the protocol's own cost:
serializing each graph, a round trip per device per pass, copying activations between
processes. Across machines add the network's round trip per device per token.

    python benchmarks/bench_rpc.py [--model PATH] [--threads N] [--prefill 128] [--decode 64] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pie_local.bench.batches import forward_batch
from pie_local.bench.driver import starter_model
from pie_local.bench.machine import threads_or_cores
from pie_local.bench.workloads import driver_prompt
from pie_local.driver import Driver, DriverParams

PAGE = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_worker(threads: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pie_local", "worker", "--port", str(port), "--threads",
                             str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("a worker did not start")


def measure(path: Path, params: DriverParams, n_prefill: int, n_decode: int) -> dict[str, float]:
    pages = list(range((n_prefill + n_decode) // PAGE + 1))
    with Driver(path, params) as drv:
        prompt = driver_prompt(n_prefill, drv.info.n_vocab)
        drv.forward(forward_batch([(prompt[:16], pages[:1], 16)], PAGE))  # warm-up
        t = time.perf_counter()
        (tok,) = drv.forward(forward_batch([(prompt, pages[: (n_prefill - 1) // PAGE + 1], n_prefill)], PAGE)).tokens
        prefill = n_prefill / (time.perf_counter() - t)
        t = time.perf_counter()
        for kv in range(n_prefill + 1, n_prefill + 1 + n_decode):
            (tok,) = drv.forward(forward_batch([([int(tok)], pages[: (kv - 1) // PAGE + 1], kv)], PAGE)).tokens
        decode = n_decode / (time.perf_counter() - t)
    return {"prefill_tok_s": round(prefill, 1), "decode_tok_s": round(decode, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF file (default: the starter model)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads, here and on each worker")
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="rounds, the two setups' order alternating (default 5)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    threads = threads_or_cores(args.threads)
    path = Path(args.model) if args.model else starter_model()
    n_pages = (args.prefill + args.decode) // PAGE + 2
    # plain weights on both sides (a worker has no repacked layout), so only the protocol differs
    base = {"n_threads": threads, "page_size": PAGE, "n_pages": n_pages, "max_batch_tokens": max(args.prefill, 16),
            "repack": False}
    runs: dict[str, list[dict[str, float]]] = {"local": [], "two_loopback_workers": []}
    workers = [_start_worker(threads) for _ in range(2)]
    try:
        setups = {"local": DriverParams(n_gpu_layers=0, **base),
                  "two_loopback_workers": DriverParams(rpc=tuple(ep for _, ep in workers), **base)}  # all layers, head
        for r in range(args.rounds):
            for side in list(setups) if r % 2 == 0 else list(setups)[::-1]:
                runs[side].append(measure(path, setups[side], args.prefill, args.decode))
                print(f"[bench] round {r + 1}/{args.rounds} {side}: {runs[side][-1]}", file=sys.stderr, flush=True)
    finally:
        for proc, _ in workers:
            proc.kill()

    def spread(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    result: dict = {"model": str(path), "threads": threads, "rounds": args.rounds}
    for side, rs in runs.items():
        result[side] = {k: spread([r[k] for r in rs]) for k in ("prefill_tok_s", "decode_tok_s")}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for side in runs:
            r = result[side]
            cell = lambda m: f"{m['median']:.1f} ({m['min']:.1f}-{m['max']:.1f})"  # noqa: E731
            print(f"{side:<22} prefill {cell(r['prefill_tok_s']):>24} tok/s   decode {cell(r['decode_tok_s']):>22} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
