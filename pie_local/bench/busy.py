"""Decode speed on a busy machine: tok/s idle and with one core kept busy by another process.

Sides, all loaded once in this process on the same GGUF:
  pie auto      the native driver with n_threads <= 0 ("auto": the allowed cores, fewer while
                other processes load them)
  pie N         the native driver with N threads, fixed
  llama.cpp N   llama-cpp-python's low-level API with N threads, at its best: ggml's extra weight
                buffer types (CPU repacking) on unless the CPU advertises AMX (baseline.py)
Each measurement decodes --tokens greedy tokens, one forward call each, after 8 warm-up tokens,
from a fresh 16-token prompt. A round measures every side idle and busy ("busy": a child process
spinning on one core); the order of the conditions flips and the sides rotate every round.
Reported per side: tok/s idle and busy (median and min-max over rounds) and busy / idle; for
"auto", the threads it ran with at the end of each busy measurement.

usage:
  python benchmarks/bench_busy.py                     # starter model, physical cores, 5 rounds
  python benchmarks/bench_busy.py --threads 2 --rounds 7 --json
  python benchmarks/bench_busy.py --rounds 1 --tokens 8     # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from pie_local.bench.baseline import LlamaSide
from pie_local.bench.driver import PieSide, starter_model
from pie_local.bench.machine import cpu_has_amx, threads_or_cores
from pie_local.bench.report import tok_per_s
from pie_local.bench.workloads import driver_prompt

PROMPT = 16
WARMUP = 8


class Decoder(Protocol):
    def decode(self, n_tokens: int) -> float: ...  # tok/s of n_tokens greedy steps
    def close(self) -> None: ...


class PieDecoder:
    def __init__(self, path: Path, threads: int, n_tokens: int) -> None:
        self.page_size = 32
        self.side = PieSide(path, threads, self.page_size, (PROMPT + WARMUP + n_tokens) // self.page_size + 2)
        self.prompt = driver_prompt(PROMPT, self.side.n_vocab)

    def decode(self, n_tokens: int) -> float:
        pages = list(range(self.side.driver.info.n_pages))
        (tok,) = self.side.forward([(self.prompt, pages[:1], PROMPT)])
        kv = PROMPT
        for _ in range(WARMUP):
            kv += 1
            (tok,) = self.side.forward([([tok], pages[: (kv + self.page_size - 1) // self.page_size], kv)])
        t = time.perf_counter()
        for _ in range(n_tokens):
            kv += 1
            (tok,) = self.side.forward([([tok], pages[: (kv + self.page_size - 1) // self.page_size], kv)])
        return tok_per_s(n_tokens, time.perf_counter() - t)

    @property
    def threads(self) -> int:
        return self.side.driver.threads

    def close(self) -> None:
        self.side.close()


class LlamaDecoder:
    def __init__(self, path: Path, threads: int, n_tokens: int, extra_bufts: bool) -> None:
        self.side = LlamaSide(path, threads, PROMPT + WARMUP + n_tokens + 64, 1, 64, extra_bufts=extra_bufts)
        self.prompt = driver_prompt(PROMPT, self.side.n_vocab)

    def decode(self, n_tokens: int) -> float:
        self.side.reset()
        (tok,) = self.side.decode([(t, i, 0, i == PROMPT - 1) for i, t in enumerate(self.prompt)])
        pos = PROMPT
        for _ in range(WARMUP):
            (tok,) = self.side.decode([(tok, pos, 0, True)])
            pos += 1
        t = time.perf_counter()
        for _ in range(n_tokens):
            (tok,) = self.side.decode([(tok, pos, 0, True)])
            pos += 1
        return tok_per_s(n_tokens, time.perf_counter() - t)

    def close(self) -> None:
        self.side.close()


@contextlib.contextmanager
def busy_core(on: bool) -> Iterator[None]:
    """Another process spinning on one core (the scheduler picks which) while the block runs."""
    if not on:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it start and settle on a core
        yield
    finally:
        spinner.kill()
        spinner.wait()


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def run_busy_bench(model: str | None = None, *, threads: int = 0, rounds: int = 5, tokens: int = 64) -> dict[str, Any]:
    """Every side idle and busy, interleaved over `rounds`; tok/s summaries and busy / idle."""
    threads = threads_or_cores(threads)
    path = Path(model) if model else starter_model()
    extra_bufts = not cpu_has_amx()
    sides: dict[str, Decoder] = {}
    try:
        sides["pie auto"] = PieDecoder(path, 0, tokens)
        sides[f"pie {threads}"] = PieDecoder(path, threads, tokens)
        sides[f"llama.cpp {threads}"] = LlamaDecoder(path, threads, tokens, extra_bufts)
        names = list(sides)
        runs: dict[str, dict[str, list[float]]] = {n: {"idle": [], "busy": []} for n in names}
        auto_threads: list[int] = []
        for r in range(rounds):
            for cond in (("idle", "busy") if r % 2 == 0 else ("busy", "idle")):
                with busy_core(cond == "busy"):
                    for name in names[r % len(names):] + names[: r % len(names)]:
                        runs[name][cond].append(sides[name].decode(tokens))
                        if name == "pie auto" and cond == "busy":
                            auto_threads.append(sides[name].threads)
    finally:
        for side in sides.values():
            side.close()
    result: dict[str, Any] = {"model": str(path), "threads": threads, "rounds": rounds, "tokens": tokens,
                              "llama_extra_bufts": extra_bufts, "auto_threads_when_busy": auto_threads, "sides": {}}
    for name, by_cond in runs.items():
        idle, busy = summary(by_cond["idle"]), summary(by_cond["busy"])
        result["sides"][name] = {"idle": idle, "busy": busy, "busy_over_idle": busy["median"] / idle["median"]}
    return result


def format_busy_table(r: dict[str, Any]) -> str:
    lines = [f"model {Path(r['model']).name}, {r['threads']} threads, {r['rounds']} rounds x {r['tokens']} tokens; "
             f"llama.cpp extra buffer types {'on' if r['llama_extra_bufts'] else 'off (AMX)'}",
             f"{'decode tok/s':<16} {'idle median':>12} {'(min-max)':>16} {'busy median':>12} {'(min-max)':>16} {'busy/idle':>10}"]  # fmt: skip
    for name, s in r["sides"].items():
        i, b = s["idle"], s["busy"]
        lines.append(f"{name:<16} {i['median']:>12.1f} {i['min']:>7.1f}-{i['max']:<8.1f} {b['median']:>12.1f} "
                     f"{b['min']:>7.1f}-{b['max']:<8.1f} {s['busy_over_idle']:>10.2f}")  # fmt: skip
    lines.append(f"pie auto ran with {r['auto_threads_when_busy']} threads at the end of its busy measurements")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF file (default: the starter model)")
    parser.add_argument("--threads", type=int, default=0, help="threads of the fixed sides (default: physical cores)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--tokens", type=int, default=64, help="decoded tokens per measurement (default 64)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if min(args.rounds, args.tokens) < 1:
        parser.error("--rounds and --tokens must be >= 1")
    if args.model and not Path(args.model).is_file():
        parser.error(f"no such file: {args.model}")
    result = run_busy_bench(args.model, threads=args.threads, rounds=args.rounds, tokens=args.tokens)
    print(json.dumps(result, indent=2) if args.json else format_busy_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
