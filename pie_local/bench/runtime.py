"""The runtime benchmark (issue 3), behind `pie-local bench` and benchmarks/bench_runtime.py.

It runs agent-shaped workloads twice on the same GGUF with the same thread count: once on
pie-local (inferlets on one Engine, forward passes batched across them, this module), once on
llama-cpp-python used the way its users would (its high-level `Llama` API with its prompt cache,
requests one after another; baseline.py). Workloads: best-of-8 from a shared 512-token prompt,
8 concurrent chats, tree-of-thought (depth 2, breadth 3) and a tool loop of 4 calls. It also
measures the runtime's overhead per decode step against a bare loop over the driver (overhead.py).

Both sides generate exactly the same number of tokens per branch (end-of-sequence is banned), so
end-to-end times compare the same work.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from typing import Callable, NamedTuple

from pie_local import JsonSchema, SamplingParams
from pie_local.bench.baseline import llama_workloads, load_llama
from pie_local.bench.calculator import observe
from pie_local.bench.machine import threads_or_cores
from pie_local.bench.overhead import measure_overhead
from pie_local.bench.report import runtime_rows, runtime_targets
from pie_local.bench.workloads import MIN_P, TEMPERATURE, TOP_K, TOP_P, BenchConfig, Workloads, make_workloads

# ---------------------------------------------------------------- pie-local side

class Branch(NamedTuple):
    tokens: list[int]  # sampled, every one but the last in the KV
    next_input: int  # the last token (or the first input when none was sampled): the next pass's input


async def decode(ctx, first_input: int, sampling: SamplingParams, max_tokens: int) -> Branch:
    """``max_tokens`` tokens after ``first_input``, one forward pass each; step i draws with the
    sampler's seed + i, so a branch's steps are not one repeated draw."""
    tokens, token = [], first_input
    for step in range(max_tokens):
        fwd = ctx.forward().input([token]).sample(0, sampling.with_seed(sampling.seed + step))
        token = int((await fwd.execute()).tokens[0])
        tokens.append(token)
    return Branch(tokens, token)


def branch_sampling(seed: int) -> SamplingParams:
    """A branch's sampler: llama-cpp-python's defaults, as on its side, with the branch's seed."""
    return SamplingParams(TEMPERATURE, top_k=TOP_K, top_p=TOP_P, min_p=MIN_P, seed=seed)


async def pie_workloads(engine, w: Workloads, cfg: BenchConfig) -> dict[str, dict]:
    """The same work as `llama_workloads`, as inferlets on one engine (branches batched)."""
    results: dict[str, dict] = {}

    async def branch(ctx, first: int, n: int, seed: int) -> list[int]:
        return (await decode(ctx, first, branch_sampling(seed), n)).tokens

    async def best_of(rt, args):
        ctx = rt.context()
        ctx.fill_tokens(w.shared_prompt[:-1])
        await ctx.flush()
        forks = ctx.fork(cfg.best_of)
        outs = await asyncio.gather(*(branch(f, w.shared_prompt[-1], cfg.best_of_tokens, i)
                                      for i, f in enumerate(forks)))
        return sum(map(len, outs))

    def chat(i: int):
        async def one_chat(rt, args):
            ctx = rt.context()
            prompt = w.chat_prompts[i]
            ctx.fill_tokens(prompt[:-1])
            return len(await branch(ctx, prompt[-1], cfg.chat_tokens, i))

        return one_chat

    async def tree(rt, args):
        root = rt.context()
        root.fill_tokens(w.tot_prompt[:-1])
        frontier, n = [(root, w.tot_prompt[-1])], 0
        for level in range(cfg.tot_depth):
            jobs = []
            for p, (ctx, first) in enumerate(frontier):
                for c, child in enumerate(ctx.fork(cfg.tot_breadth)):
                    seed = 100 * level + 10 * p + c
                    jobs.append((child, decode(child, first, branch_sampling(seed), cfg.tot_tokens)))
            outs = await asyncio.gather(*(job for _, job in jobs))
            n += sum(len(o.tokens) for o in outs)
            frontier = [(child, o.next_input) for (child, _), o in zip(jobs, outs)]
        return n

    async def tools(rt, args):
        ctx = rt.context()
        ctx.fill(w.tool_prompt)
        n = 0
        for _ in range(cfg.tool_calls):
            ctx.fill("Action: ")
            action = await ctx.generate(max_tokens=48, constrain=JsonSchema(w.call_schema))
            n += len(ctx.last.token_ids)
            ctx.fill(f"\nObservation: {observe(action)}\n")
        return n

    async def timed(name: str, coro) -> None:
        t0 = time.perf_counter()
        value = await coro
        results[name] = {"seconds": time.perf_counter() - t0, "generated_tokens": int(value)}

    await timed("best_of", engine.run(best_of))
    chats = [engine.launch(chat(i)) for i in range(len(w.chat_prompts))]
    await timed("chats", _sum_results(chats))
    await timed("tree_of_thought", engine.run(tree))
    await timed("tool_loop", engine.run(tools))
    return results


async def _sum_results(handles) -> int:
    return sum(await asyncio.gather(*(h.result() for h in handles)))


# ---------------------------------------------------------------- the whole benchmark

def run_runtime_bench(cfg: BenchConfig | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Run the issue-3 benchmark; returns a JSON-able dict with times, throughputs and ratios."""
    cfg = cfg or BenchConfig()
    return asyncio.run(_run_runtime_bench(cfg, progress or (lambda msg: None)))


async def _run_runtime_bench(cfg: BenchConfig, progress: Callable[[str], None]) -> dict:
    from pie_local import Engine, EngineConfig
    from pie_local.driver import DriverParams
    from pie_local.models import resolve_model

    model = resolve_model(cfg.model)
    threads = threads_or_cores(cfg.n_threads)
    engine = Engine(model.path, EngineConfig(driver=DriverParams(n_threads=threads, n_pages=512, max_batch_tokens=512)))
    progress(f"loading {model.name} ({threads} threads)")
    await engine.start()
    try:
        w = make_workloads(engine, cfg)
        progress("pie-local workloads")
        pie = await pie_workloads(engine, w, cfg)
        progress("runtime overhead per decode step (runtime vs bare driver, interleaved)")
        overhead = await measure_overhead(engine, model.path, threads, w.shared_prompt[:64], cfg.overhead_steps)
    finally:
        await engine.stop()
    progress("llama-cpp-python workloads")
    llm = load_llama(model.path, threads)
    try:
        llama = llama_workloads(llm, w, cfg)
    finally:
        llm.close()
    rows = runtime_rows(pie, llama)
    return {
        "model": model.name, "threads": threads, "load_avg_1m": round(os.getloadavg()[0], 2),
        "config": dataclasses.asdict(cfg), "workloads": rows,
        "overhead": overhead, "targets": runtime_targets(rows, overhead),
    }
