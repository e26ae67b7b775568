"""Soak: 200 inferlets on the real starter model, launched over time, with cancels, exceptions
and timeouts landing mid-prefill and mid-decode. Afterwards no run hangs, every page is back
(the pool's used count is its idle count, zero) and the greedy runs made during the soak equal
the same runs made alone: one failing inferlet never harms another."""

from __future__ import annotations

import asyncio
import random

import pytest

from pie_local.driver.types import DriverParams
from pie_local.runtime import Engine, EngineConfig, InferletCancelled, Limits, Param, WallTimeExceeded

pytestmark = [pytest.mark.slow, pytest.mark.real_driver, pytest.mark.timeout(900)]

N_INFERLETS = 200
MAX_RUNNING = 16
REFERENCE_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a robot",
                     "The three laws of motion are", "In 1969, the first"]
LONG_PROMPT = "A shared document about paged attention and prefix caching. " * 30  # ~300 tokens


class Boom(RuntimeError):
    pass


async def greedy(rt, args):
    ctx = rt.context()
    ctx.fill(args.prompt)
    await ctx.generate(max_tokens=args.tokens)
    return ctx.last.token_ids


async def raises_midway(rt, args):
    ctx = rt.context()
    ctx.fill(args.prompt)
    async for _ in ctx.stream(max_tokens=args.tokens):
        if len(ctx.last.token_ids) >= args.after:
            raise Boom("deliberate failure mid-decode")
    raise Boom("deliberate failure after decode")


async def forks_then_decodes(rt, args):
    ctx = rt.context()
    ctx.fill(args.prompt)
    await ctx.flush()
    branches = ctx.fork(3)
    from pie_local import SamplingParams

    return await asyncio.gather(*(b.generate(SamplingParams(temperature=0.8, seed=i), max_tokens=args.tokens)
                                  for i, b in enumerate(branches)))


for fn in (greedy, raises_midway, forks_then_decodes):
    fn.PARAMETERS = {"prompt": Param(str, required=True), "tokens": Param(int, default=16),
                     "after": Param(int, default=0)}


async def run_alone(engine: Engine, prompt: str) -> list[int]:
    return await engine.run(greedy, {"prompt": prompt, "tokens": 24})


async def test_soak_200_inferlets_with_failures(starter_gguf) -> None:
    config = EngineConfig(driver=DriverParams(n_threads=2, n_pages=512))
    async with Engine(str(starter_gguf), config) as engine:
        alone = [await run_alone(engine, p) for p in REFERENCE_PROMPTS]
        idle_used = engine.pool.n_used
        rng = random.Random(1234)
        running: set[asyncio.Task] = set()
        outcomes: dict[str, int] = {}
        references: list[tuple[str, asyncio.Task]] = []

        async def one(kind: str) -> str:
            prompt = LONG_PROMPT + str(rng.random()) if rng.random() < 0.4 else f"Story {rng.random()}:"
            if kind == "reference":
                raise AssertionError("references are launched separately")
            if kind == "cancel_prefill":
                handle = engine.launch(greedy, {"prompt": LONG_PROMPT * 2 + str(rng.random()), "tokens": 8})
                await asyncio.sleep(rng.uniform(0.0, 0.3))
                handle.cancel()
            elif kind == "cancel_decode":
                handle = engine.launch(greedy, {"prompt": prompt, "tokens": 64})
                await asyncio.sleep(rng.uniform(0.3, 1.5))
                handle.cancel()
            elif kind == "raise":
                handle = engine.launch(raises_midway, {"prompt": prompt, "tokens": 32, "after": rng.randint(0, 8)})
            elif kind == "timeout":
                handle = engine.launch(greedy, {"prompt": prompt, "tokens": 200},
                                       Limits(wall_time=rng.uniform(0.2, 1.5)))
            elif kind == "fork":
                handle = engine.launch(forks_then_decodes, {"prompt": prompt, "tokens": 12})
            else:
                handle = engine.launch(greedy, {"prompt": prompt, "tokens": rng.randint(1, 24)})
            try:
                await asyncio.wait_for(handle.result(), timeout=120)
                return "done"
            except InferletCancelled:
                return "cancelled"
            except WallTimeExceeded:
                return "timed out"
            except Boom:
                return "raised"

        kinds = ["cancel_prefill", "cancel_decode", "raise", "timeout", "fork", "plain"]
        for i in range(N_INFERLETS - len(REFERENCE_PROMPTS)):
            while len(running) >= MAX_RUNNING:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    running.discard(task)
                    outcomes[task.result()] = outcomes.get(task.result(), 0) + 1
            running.add(asyncio.create_task(one(rng.choice(kinds))))
            if i % 39 == 20:  # the greedy references run in the thick of it
                prompt = REFERENCE_PROMPTS[len(references)]
                references.append((prompt, asyncio.create_task(run_alone(engine, prompt))))
        for task in asyncio.as_completed(list(running)):
            result = await task
            outcomes[result] = outcomes.get(result, 0) + 1
        during = [await asyncio.wait_for(task, timeout=120) for _, task in references]

        assert sum(outcomes.values()) == N_INFERLETS - len(REFERENCE_PROMPTS)
        for outcome in ("done", "cancelled", "timed out", "raised"):
            assert outcomes.get(outcome, 0) > 0, outcomes
        assert [h for h in engine.inferlets() if not h.done()] == []
        for _ in range(300):  # a cancelled request still in flight gives its pages back when its batch ends
            if engine.stats().queued_requests == 0 and engine.pool.n_used == idle_used:
                break
            await asyncio.sleep(0.1)
        assert engine.pool.n_used == idle_used == 0
        assert during == alone
