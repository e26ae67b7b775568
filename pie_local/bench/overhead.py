"""The runtime's overhead per decode step: a greedy decode loop through the runtime against the
same loop straight on the driver.

Both loops run in the same process, interleaved in short rounds after a warm-up, and the median
step time of each is compared, so a noisy machine biases neither side. Both forward exactly the
same batch: one token at the same position, greedy, log-probabilities returned, over the same
page ids (the bare loop's pool mirrors the runtime context's page table, which decides whether
the driver reads the KV as one slice or gathers it).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time

from pie_local import SamplingParams
from pie_local.bench.batches import forward_batch
from pie_local.driver import DriverParams

WARMUP_STEPS = 8
STEPS_PER_ROUND = 4


class BareDecoder:
    """A greedy single-sequence decode loop straight on a Driver: the floor the runtime adds to."""

    def __init__(self, path: str | os.PathLike, n_threads: int, prompt: list[int], page_ids: list[int],
                 page_size: int, n_pages: int) -> None:
        from pie_local.driver import Driver

        self.page_size = page_size
        self.page_ids = page_ids
        self.driver = Driver(path, DriverParams(n_threads=n_threads, page_size=page_size, n_pages=n_pages,
                                                max_batch_tokens=512))
        self.token = self._forward(prompt, 0)
        self.position = len(prompt)
        self.steps(WARMUP_STEPS)

    def _forward(self, tokens: list[int], start: int) -> int:
        kv = start + len(tokens)
        pages = self.page_ids[: -(-kv // self.page_size)]
        batch = forward_batch([(tokens, pages, kv)], self.page_size, return_logprobs=True)
        return int(self.driver.forward(batch).tokens[0])

    def steps(self, n: int, page_ids: list[int] | None = None) -> list[float]:
        """``n`` steps; ``page_ids``: the runtime context's page table, already past these steps."""
        self.page_ids = page_ids or self.page_ids
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.token = self._forward([self.token], self.position)
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
        self.messages = None

    async def start(self) -> list[int]:
        """Prefill the prompt and warm up; returns the context's page ids."""
        async def loop(rt, args):
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
        msg = await anext(self.messages)
        return msg.data

    async def close(self) -> None:
        await self.requests.put(None)
        await self.handle.result()


async def measure_overhead(engine, path, n_threads: int, prompt: list[int], steps: int) -> dict:
    """Median step times of both loops over ``steps`` steps each, and the runtime's overhead in %."""
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
            "kv_page_runs": page_runs(page_ids)}


def page_runs(ids: list[int]) -> int:
    """Runs of consecutive ids (1: the driver reads the KV as one slice)."""
    return sum(1 for i, x in enumerate(ids) if i == 0 or x != ids[i - 1] + 1)
