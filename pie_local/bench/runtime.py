"""Benchmark core shared by `pie-local bench` and the scripts in benchmarks/.

The runtime benchmark (issue 3) runs agent-shaped workloads twice on the same GGUF with the same
thread count: once on pie-local (inferlets on one Engine, forward passes batched across them), once
on llama-cpp-python used the way its users would (its high-level `Llama` API with its prompt cache,
requests one after another). Workloads: best-of-8 from a shared 512-token prompt, 8 concurrent
chats, tree-of-thought (depth 2, breadth 3) and a tool loop of 4 calls. It also measures the
runtime's overhead per decode step against a bare loop over the driver.

Both sides generate exactly the same number of tokens per branch (end-of-sequence is banned), so
end-to-end times compare the same work.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from pie_local.bench.machine import threads_or_cores
from pie_local.bench.report import runtime_rows, runtime_targets
from pie_local.llama_logs import route_llama_logs


@dataclass
class BenchConfig:
    model: str | None = None  # name or path; None: the default model
    n_threads: int = 0  # <= 0: physical cores (same value on both sides)
    prompt_tokens: int = 512  # shared prompt of best-of-n
    best_of: int = 8
    best_of_tokens: int = 32
    n_chats: int = 8
    chat_tokens: int = 32
    tot_depth: int = 2
    tot_breadth: int = 3
    tot_tokens: int = 16
    tool_calls: int = 4
    overhead_steps: int = 64

    @classmethod
    def quick(cls, **overrides: Any) -> "BenchConfig":
        base = dict(prompt_tokens=128, best_of_tokens=8, chat_tokens=8, tot_tokens=6, overhead_steps=16)
        base.update(overrides)
        return cls(**base)


# ---------------------------------------------------------------- llama-cpp-python baseline

# Sampling of every branch on both sides: llama-cpp-python's defaults (its users' settings; with
# a 262k vocabulary, top_k=0 would make its sampler sort the whole vocabulary every token).
TEMPERATURE, TOP_K, TOP_P, MIN_P = 0.8, 40, 0.95, 0.05


@contextlib.contextmanager
def _no_extra_bufts():
    """`Llama` has no argument for `use_extra_bufts`: patch its default model params while it loads.

    ggml's AMX weight repacking (an "extra buffer type") crashes on CPUs that advertise AMX inside
    VMs that do not enable it; the plain CPU buffer type is safe everywhere.
    """
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params

    def patched():
        params = original()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = patched
    try:
        yield
    finally:
        lib.llama_model_default_params = original


def load_llama(path: str | os.PathLike, n_threads: int, n_ctx: int = 2048):
    """A llama-cpp-python `Llama` set up the way the benchmark uses it (prompt cache on)."""
    import llama_cpp

    route_llama_logs()
    with _no_extra_bufts():
        llm = llama_cpp.Llama(
            str(path),
            n_ctx=n_ctx,
            n_batch=512,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            swa_full=True,  # lets its prefix-match reuse the KV of sliding-window models
            verbose=False,
        )
    route_llama_logs()  # Llama(verbose=...) installs its own stderr logger; take logs back
    llm.set_cache(llama_cpp.LlamaRAMCache(capacity_bytes=1 << 30))
    return llm


def _eog_bias(llm) -> dict[int, float]:
    """Ban every end-of-generation token so each branch generates exactly max_tokens."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    return {t: -1e9 for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)}


def _llama_complete(llm, tokens: list[int], max_tokens: int, bias: dict, temperature: float = TEMPERATURE,
                    seed: int = 0) -> tuple[list[int], int]:
    """One completion through the high-level API: (its text as token ids, tokens generated)."""
    out = llm.create_completion(tokens, max_tokens=max_tokens, temperature=temperature, top_k=TOP_K, top_p=TOP_P,
                                min_p=MIN_P, seed=seed, logit_bias=bias)
    text_ids = llm.tokenize(out["choices"][0]["text"].encode(), add_bos=False, special=True)
    return text_ids, out["usage"]["completion_tokens"]


def llama_workloads(llm, w: "Workloads", cfg: BenchConfig) -> dict[str, dict]:
    """The four workloads, sequentially, the way a llama-cpp-python user writes them."""
    import llama_cpp

    bias = _eog_bias(llm)
    results: dict[str, dict] = {}

    def timed(name: str, fn: Callable[[], int]) -> None:
        llm.reset()
        t0 = time.perf_counter()
        tokens = fn()
        results[name] = {"seconds": time.perf_counter() - t0, "generated_tokens": tokens}

    def best_of() -> int:
        return sum(_llama_complete(llm, w.shared_prompt, cfg.best_of_tokens, bias, seed=i)[1]
                   for i in range(cfg.best_of))

    def chats() -> int:
        return sum(_llama_complete(llm, p, cfg.chat_tokens, bias, seed=i)[1] for i, p in enumerate(w.chat_prompts))

    def tree() -> int:
        n, frontier = 0, [w.tot_prompt]
        for level in range(cfg.tot_depth):
            children = []
            for p, parent in enumerate(frontier):
                for c in range(cfg.tot_breadth):
                    thought, generated = _llama_complete(llm, parent, cfg.tot_tokens, bias, seed=100 * level + 10 * p + c)
                    n += generated
                    children.append(parent + thought)  # the next prompt: the parent's text + this thought
            frontier = children
        return n

    def tools() -> int:
        grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(w.call_schema), verbose=False)
        text, n = w.tool_prompt, 0
        for _ in range(cfg.tool_calls):
            text += "Action: "
            ids = llm.tokenize(text.encode(), add_bos=True, special=True)
            out = llm.create_completion(ids, max_tokens=48, temperature=0.0, grammar=grammar)
            action = out["choices"][0]["text"]
            n += out["usage"]["completion_tokens"]
            text += f"{action}\nObservation: {w.observe(action)}\n"
        return n

    timed("best_of", best_of)
    timed("chats", chats)
    timed("tree_of_thought", tree)
    timed("tool_loop", tools)
    return results


# ---------------------------------------------------------------- pie-local side

@dataclass
class Workloads:
    """The inputs both sides get (token ids where exactness matters)."""

    shared_prompt: list[int]  # BOS + cfg.prompt_tokens - 1 tokens
    chat_prompts: list[list[int]]
    tot_prompt: list[int]
    tool_prompt: str
    call_schema: dict

    @staticmethod
    def observe(action: str) -> str:
        from pie_local.inferlets.react_agent import calculator

        try:
            return calculator(json.loads(action)["arguments"]["expression"])
        except Exception as exc:  # noqa: BLE001 — a bad call is an observation, as in an agent
            return f"Error: {exc}"


def make_workloads(engine, cfg: BenchConfig) -> Workloads:
    from pie_local.inferlets.react_agent import action_schema, calculator, header
    from pie_local.runtime.tools import Tool

    tok = engine.tokenizer
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    essay = ("The history of the printing press begins in East Asia with woodblock printing, long before "
             "movable type reached Europe. Gutenberg's press combined a screw press, oil-based ink and a "
             "hand mould for casting type, and within fifty years presses ran in hundreds of cities. ")
    ids = tok.encode(essay * (cfg.prompt_tokens // 20 + 2))
    shared = bos + ids[: cfg.prompt_tokens - len(bos)]
    template = engine.chat_template
    topics = ["rivers", "volcanoes", "bees", "chess", "bridges", "comets", "bread", "violins"]
    chats = []
    for topic in topics[: cfg.n_chats]:
        ids = tok.encode(template.render([{"role": "user", "content": f"Tell me about {topic}."}]))
        chats.append(ids if ids[:1] == bos else bos + ids)  # templates may render the BOS themselves
    tot = bos + tok.encode("Problem: plan a three-day trip to Rome on a small budget.\nThoughts:\n")
    tools = [Tool.from_function(calculator)]
    question = "What is (17 * 23) + (45 * 12) - 99, computed step by step?"
    return Workloads(shared, chats, tot, header(tools, question), action_schema(tools, allow_final=False))


async def pie_workloads(engine, w: Workloads, cfg: BenchConfig) -> dict[str, dict]:
    """The same work as `llama_workloads`, as inferlets on one engine (branches batched)."""
    from pie_local.inferlets._common import decode
    from pie_local.runtime.constraints import JsonSchema
    from pie_local.runtime.sampling import SamplingParams

    results: dict[str, dict] = {}

    def sampling(seed: int) -> SamplingParams:
        return SamplingParams(TEMPERATURE, top_k=TOP_K, top_p=TOP_P, min_p=MIN_P, seed=seed)

    async def branch(ctx, first: int, n: int, seed: int) -> list[int]:
        return (await decode(ctx, first, sampling(seed), n)).token_ids

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
                    jobs.append((child, decode(child, first, sampling(100 * level + 10 * p + c), cfg.tot_tokens)))
            outs = await asyncio.gather(*(job for _, job in jobs))
            n += sum(len(o.token_ids) for o in outs)
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
            ctx.fill(f"\nObservation: {w.observe(action)}\n")
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


# ---------------------------------------------------------------- runtime overhead per decode step
# Both loops run in the same process, interleaved in short rounds after a warm-up, and the median
# step time of each is compared, so a noisy machine biases neither side. Both forward exactly the
# same batch: one token at the same position, greedy, log-probabilities returned, over the same
# page ids (the bare loop's pool mirrors the runtime context's page table, which decides whether
# the driver reads the KV as one slice or gathers it).

WARMUP_STEPS = 8
STEPS_PER_ROUND = 4


class BareDecoder:
    """A greedy single-sequence decode loop straight on a Driver: the floor the runtime adds to."""

    def __init__(self, path: str | os.PathLike, n_threads: int, prompt: list[int], page_ids: list[int],
                 page_size: int, n_pages: int) -> None:
        from pie_local.driver import Driver
        from pie_local.driver.types import DriverParams

        self.page_size = page_size
        self.page_ids = page_ids
        self.driver = Driver(path, DriverParams(n_threads=n_threads, page_size=page_size, n_pages=n_pages,
                                                max_batch_tokens=512))
        self.token = int(self.driver.forward(self._batch(prompt, 0)).tokens[0])
        self.position = len(prompt)
        self.steps(WARMUP_STEPS)

    def _batch(self, tokens: list[int], start: int):
        import numpy as np

        from pie_local.driver.types import ForwardBatch, SamplerParams

        ps, kv = self.page_size, start + len(tokens)
        pages = -(-kv // ps)
        return ForwardBatch(
            tokens=np.asarray(tokens, np.int32), positions=np.arange(start, kv, dtype=np.int32),
            qo_indptr=np.asarray([0, len(tokens)], np.int32),
            kv_page_indices=np.asarray(self.page_ids[:pages], np.int32),
            kv_page_indptr=np.asarray([0, pages], np.int32),
            kv_last_page_len=np.asarray([kv - (pages - 1) * ps], np.int32),
            output_rows=np.asarray([len(tokens) - 1], np.int32), samplers=[SamplerParams()],
            return_logprobs=True)

    def steps(self, n: int, page_ids: list[int] | None = None) -> list[float]:
        """``n`` steps; ``page_ids``: the runtime context's page table, already past these steps."""
        self.page_ids = page_ids or self.page_ids
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.token = int(self.driver.forward(self._batch([self.token], self.position)).tokens[0])
            times.append(time.perf_counter() - t0)
            self.position += 1
        return times

    def close(self) -> None:
        self.driver.close()


class RuntimeDecoder:
    """The same loop as an inferlet: one Forward per token through the engine's scheduler. Each
    round sends back its step times and the context's page ids."""

    def __init__(self, engine, prompt: list[int]) -> None:
        self.engine, self.prompt = engine, prompt
        self.requests: asyncio.Queue = asyncio.Queue()
        self.handle = None

    async def start(self) -> list[int]:
        """Prefill the prompt and warm up; returns the context's page ids."""
        async def loop(rt, args):
            from pie_local.runtime.sampling import SamplingParams

            ctx = rt.context()
            ctx.fill_tokens(self.prompt[:-1])
            token, greedy = self.prompt[-1], SamplingParams()
            while (n := await self.requests.get()) is not None:
                times = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    out = await ctx.forward().input([token]).sample(0, greedy).execute()
                    token = int(out.tokens[0])
                    times.append(time.perf_counter() - t0)
                rt.send((times, ctx.page_ids))

        self.handle = self.engine.launch(loop)
        self.messages = self.handle.messages()
        _, page_ids = await self.steps(WARMUP_STEPS + 1)  # + the prompt's pass
        return page_ids

    async def steps(self, n: int) -> tuple[list[float], list[int]]:
        await self.requests.put(n)
        msg = await self.messages.__anext__()
        return msg.data

    async def close(self) -> None:
        await self.requests.put(None)
        await self.handle.result()


async def measure_overhead(engine, path, n_threads: int, prompt: list[int], steps: int) -> dict:
    import statistics

    rt = RuntimeDecoder(engine, prompt)
    bare = None
    try:
        page_ids = await rt.start()
        info = engine.info
        bare = await asyncio.to_thread(BareDecoder, path, n_threads, prompt, page_ids, info.page_size, info.n_pages)
        bare_times, rt_times = [], []
        for _ in range(max(1, steps // STEPS_PER_ROUND)):
            times, page_ids = await rt.steps(STEPS_PER_ROUND)
            rt_times += times
            bare_times += await asyncio.to_thread(bare.steps, STEPS_PER_ROUND, page_ids)
    finally:
        await rt.close()
        if bare is not None:
            bare.close()
    b, r = statistics.median(bare_times), statistics.median(rt_times)
    return {"runtime_step_ms": round(r * 1e3, 3), "bare_driver_step_ms": round(b * 1e3, 3),
            "overhead_pct": round(100 * (r - b) / b, 2), "steps": len(rt_times),
            "kv_page_runs": _runs(page_ids)}


def _runs(ids: list[int]) -> int:
    """Runs of consecutive ids (1: the driver reads the KV as one slice)."""
    return sum(1 for i, x in enumerate(ids) if i == 0 or x != ids[i - 1] + 1)


# ---------------------------------------------------------------- the whole benchmark

def run_runtime_bench(cfg: BenchConfig | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Run the issue-3 benchmark; returns a JSON-able dict with times, throughputs and ratios."""
    cfg = cfg or BenchConfig()
    return asyncio.run(_run_runtime_bench(cfg, progress or (lambda msg: None)))


async def _run_runtime_bench(cfg: BenchConfig, progress: Callable[[str], None]) -> dict:
    from pie_local.models import resolve_model
    from pie_local.runtime.engine import Engine, EngineConfig

    model = resolve_model(cfg.model)
    threads = threads_or_cores(cfg.n_threads)
    engine = Engine(model.path, EngineConfig(n_threads=threads, n_pages=512, max_batch_tokens=512))
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
