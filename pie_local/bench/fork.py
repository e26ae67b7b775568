"""Best-of-n from one shared prompt (issue 11): pie-local forks the prompt's KV into n branches
that decode in the same batches; llama-cpp-python completes the prompt n times the way its
users write it (`create_completion` per branch, its own prefix reuse keeping the prompt's KV).

Both sides sample every branch alike, with a seed per branch: `defaults` is llama-cpp-python's
own (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05), `top_p` is temperature 0.8 and
top-p 0.95 over the whole vocabulary. End-of-generation tokens are banned on llama.cpp's side
and never stop pie's branches, so each branch makes exactly `tokens` tokens. Rounds alternate
which side goes first; each side loads its model once per round, outside the timing. Each side
holds its weights at its best: pie repacked, llama.cpp with its extra buffer types where the
AMX probe allows. Each side runs on a thread of its own that ends with it (machine.on_own_thread:
OpenMP pools left behind by one side slow the other's barriers).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pie_local.bench.machine import extra_bufts_safe, on_own_thread, threads_or_cores

SAMPLINGS = {
    "defaults": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
    "top_p": dict(temperature=0.8, top_k=0, top_p=0.95, min_p=0.0),
}


def _prompt(tokenizer, n: int) -> list[int]:
    """BOS + n - 1 tokens of an essay (the same ids on both sides)."""
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    essay = ("The history of the printing press begins in East Asia with woodblock printing, long before "
             "movable type reached Europe. Gutenberg's press combined a screw press, oil-based ink and a "
             "hand mould for casting type, and within fifty years presses ran in hundreds of cities. ")
    return (bos + tokenizer.encode(essay * (n // 20 + 2)))[:n]


async def _pie_best_of(path: Path, threads: int, prompt: list[int], n: int, tokens: int,
                       sampling: dict[str, float]) -> tuple[float, int]:
    from pie_local import Engine, EngineConfig, SamplingParams
    from pie_local.driver import DriverParams

    engine = Engine(path, EngineConfig(driver=DriverParams(n_threads=threads, n_pages=512, max_batch_tokens=512)))
    await engine.start()
    try:
        async def branch(ctx, seed: int) -> int:
            params = SamplingParams(seed=seed, **sampling)
            token, made = prompt[-1], 0
            for step in range(tokens):
                fwd = ctx.forward().input([token]).sample(0, params.with_seed(seed + step))
                token = int((await fwd.execute()).tokens[0])
                made += 1
            return made

        async def best_of(rt, args) -> int:
            ctx = rt.context()
            ctx.fill_tokens(prompt[:-1])
            await ctx.flush()
            return sum(await asyncio.gather(*(branch(f, i) for i, f in enumerate(ctx.fork(n)))))

        t0 = time.perf_counter()
        made = await engine.run(best_of)
        return time.perf_counter() - t0, made
    finally:
        await engine.stop()


def _llama_best_of(path: Path, threads: int, prompt: list[int], n: int, tokens: int,
                   sampling: dict[str, float], extra_bufts: bool) -> tuple[float, int]:
    import contextlib

    import llama_cpp

    from pie_local.bench.baseline import _eog_bias, no_extra_bufts
    from pie_local.llama_logs import route_llama_logs

    route_llama_logs()
    with no_extra_bufts() if not extra_bufts else contextlib.nullcontext():
        llm = llama_cpp.Llama(str(path), n_ctx=len(prompt) + tokens + 64, n_batch=512, n_threads=threads,
                              n_threads_batch=threads, swa_full=True, verbose=False)
    route_llama_logs()
    try:
        bias = _eog_bias(llm)
        t0 = time.perf_counter()
        made = 0
        for i in range(n):
            out = llm.create_completion(prompt, max_tokens=tokens, seed=i, logit_bias=bias, **sampling)
            made += out["usage"]["completion_tokens"]
        return time.perf_counter() - t0, made
    finally:
        llm.close()


def run_fork_bench(model: str | None = None, *, threads: int = 0, prompt_tokens: int = 512, n: int = 8,
                   tokens: int = 128, samplings: tuple[str, ...] = ("defaults", "top_p"),
                   rounds: int = 5) -> dict[str, Any]:
    from pie_local.models import resolve_model
    from pie_local.models.tokenizer import Tokenizer

    path = Path(model) if model and Path(model).is_file() else Path(resolve_model(model).path)
    threads = threads_or_cores(threads)
    prompt = _prompt(Tokenizer.from_gguf(path), prompt_tokens)  # the same ids on both sides
    extra, why = extra_bufts_safe()
    results: dict[str, Any] = {}
    for name in samplings:
        sampling = SAMPLINGS[name]
        runs: dict[str, list[float]] = {"pie": [], "llama_cpp": [], "speedup": []}
        for r in range(rounds):
            times: dict[str, float] = {}
            for side in ("pie", "llama_cpp") if r % 2 == 0 else ("llama_cpp", "pie"):
                if side == "pie":
                    secs, made = on_own_thread(asyncio.run, _pie_best_of(path, threads, prompt, n, tokens, sampling))
                else:
                    secs, made = on_own_thread(_llama_best_of, path, threads, prompt, n, tokens, sampling, extra)
                if made != n * tokens:
                    raise RuntimeError(f"{side} made {made} tokens, not {n * tokens}")
                times[side] = secs
                runs[side].append(n * tokens / secs)
                print(f"[bench] {name} round {r + 1}/{rounds} {side}: {n * tokens / secs:.1f} tok/s",
                      file=sys.stderr, flush=True)
            runs["speedup"].append(times["llama_cpp"] / times["pie"])
        results[name] = {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in runs.items()}
        results[name]["sampling"] = sampling
    return {"model": str(path), "threads": threads, "rounds": rounds, "prompt_tokens": prompt_tokens, "n": n,
            "tokens": tokens, "llama_cpp_weights": "extra buffer types on" if extra else f"plain ({why})",
            "results": results}


def format_fork_report(r: dict[str, Any]) -> str:
    lines = [f"best-of-{r['n']} from a {r['prompt_tokens']}-token prompt, {r['tokens']} tokens per branch, "
             f"{Path(r['model']).name}, {r['threads']} threads, {r['rounds']} rounds, median (min-max)",
             f"llama.cpp weights: {r['llama_cpp_weights']}; pie: repacked", "",
             f"{'sampling':<10}{'pie tok/s':>24}{'llama-cpp-python tok/s':>26}{'speedup':>22}"]
    for name, s in r["results"].items():
        cell = lambda m, f: f"{m['median']:{f}} ({m['min']:{f}}-{m['max']:{f}})"  # noqa: E731
        lines.append(f"{name:<10}{cell(s['pie'], '.1f'):>24}{cell(s['llama_cpp'], '.1f'):>26}"
                     f"{cell(s['speedup'], '.2f') + 'x':>22}")
    return "\n".join(lines)
