"""The generation features' benchmark: what forced tokens in one pass and speculation buy, on
pie-local alone.

`json_fast_forward` generates as the json-output inferlet does, greedily, on a schema with long
fixed keys, with fast-forward off (every forced token sampled in its own pass) and on (forced
tokens ride the pass of the next sampled token). `speculation` decodes greedily a text that
repeats its prompt, plainly, with the n-gram drafter (prompt lookup) and with a draft model (the
same model in a second Engine: every draft is accepted, but a draft pass costs as much as a
target pass, so it shows the mechanics' overhead, not a speedup). Each reports tokens/s and passes.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Callable

from pie_local import JsonSchema
from pie_local.bench.machine import threads_or_cores

LONG_KEY_SCHEMA = {
    "type": "object",
    "properties": {
        "customer_identification_number": {"type": "integer", "minimum": 0, "maximum": 9999},
        "customer_full_legal_name_as_registered": {"type": "string", "maxLength": 24},
        "preferred_contact_method_for_notifications": {"enum": ["email", "phone", "post"]},
        "is_account_currently_in_good_standing": {"type": "boolean"},
        "number_of_outstanding_support_tickets": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["customer_identification_number", "customer_full_legal_name_as_registered",
                 "preferred_contact_method_for_notifications", "is_account_currently_in_good_standing",
                 "number_of_outstanding_support_tickets"],
    "additionalProperties": False,
}
JSON_PROMPT = "Ada Lovelace, customer 1815, prefers email, account fine, two open tickets."
SPEC_PROMPT = ("def total_price(items, tax_rate):\n    subtotal = sum(item.price * item.quantity for item in items)\n"
               "    tax = subtotal * tax_rate\n    return subtotal + tax\n\n\n"
               "def total_weight(items, packaging):\n    subtotal = sum(item.")
SPEC_TOKENS = 64


def json_prompt(schema: dict, tag: str) -> str:
    """What the json-output inferlet fills, after a request tag: a run never finds another run's
    output in the prefix cache (its pages hash from the first token on)."""
    return f"Request {tag}. {JSON_PROMPT}\nJSON matching the schema {json.dumps(schema, separators=(',', ':'))}:\n"


async def _json_runs(engine, runs: int, fast_forward: bool) -> dict:
    """``runs`` json-output generations; the best time (the machine is shared, the best is the least noisy)."""
    best, out = None, None
    for i in range(runs):
        ctx = engine.context()
        ctx.fill(json_prompt(LONG_KEY_SCHEMA, f"{'ff' if fast_forward else 'sampled'}-{i}"))
        await ctx.flush()  # the prompt is not what is measured
        started = time.perf_counter()
        result = await ctx.generate(max_tokens=200, constrain=JsonSchema(LONG_KEY_SCHEMA), fast_forward=fast_forward)
        elapsed = time.perf_counter() - started
        ctx.release()
        if best is None or elapsed < best:
            best, out = elapsed, result
    return {"seconds": best, "tokens": len(out.token_ids), "passes": out.forward_passes,
            "forced_tokens": out.forced_tokens, "tok_per_s": len(out.token_ids) / best, "text": str(out)}


async def _spec_runs(engine, runs: int, speculator=None, draft_tokens: int = 8) -> dict:
    """``runs`` greedy generations of SPEC_TOKENS tokens; the best time. Every run has the same
    prompt (its pages come from the prefix cache, before the clock starts): decode passes never
    adopt cached pages (their first row is their first token), so no run reuses another's output."""
    best, out = None, None
    for _ in range(runs):
        ctx = engine.context()
        ctx.fill(SPEC_PROMPT)
        await ctx.flush()
        started = time.perf_counter()
        result = await ctx.generate(max_tokens=SPEC_TOKENS, speculator=speculator, draft_tokens=draft_tokens)
        elapsed = time.perf_counter() - started
        ctx.release()
        if best is None or elapsed < best:
            best, out = elapsed, result
    return {"seconds": best, "tokens": len(out.token_ids), "passes": out.forward_passes,
            "drafted": out.drafted_tokens, "accepted": out.accepted_tokens, "tok_per_s": len(out.token_ids) / best,
            "token_ids": list(out.token_ids)}


async def _speculation(engine, runs: int, progress: Callable[[str], None]) -> dict:
    from pie_local.runtime import Engine, EngineConfig
    from pie_local.runtime.speculation import ModelDrafter, NgramDrafter

    progress("greedy decoding, no drafter")
    plain = await _spec_runs(engine, runs)
    progress("greedy decoding, n-gram drafter")
    ngram = await _spec_runs(engine, runs, NgramDrafter(3), draft_tokens=8)
    progress("greedy decoding, the same model as draft model")
    async with Engine(engine.model_path, EngineConfig(driver=engine.config.driver)) as draft_engine:
        drafter = ModelDrafter(draft_engine)
        model = await _spec_runs(engine, runs, drafter, draft_tokens=4)
        drafter.release()
    rows = {"plain": plain, "ngram": ngram, "draft_model": model}
    for row in (ngram, model):
        row["speedup"] = row["tok_per_s"] / plain["tok_per_s"]
        row["same_output"] = row.pop("token_ids") == plain["token_ids"]
    plain.pop("token_ids")
    return rows


async def _run(model: str | None, threads: int, runs: int, progress: Callable[[str], None]) -> dict:
    from pie_local.driver.types import DriverParams
    from pie_local.runtime import Engine, EngineConfig

    config = EngineConfig(driver=DriverParams(n_threads=threads, n_pages=256))
    async with Engine(model, config) as engine:
        progress("json-output, fast-forward off")
        off = await _json_runs(engine, runs, fast_forward=False)
        progress("json-output, fast-forward on")
        on = await _json_runs(engine, runs, fast_forward=True)
        speculation = await _speculation(engine, runs, progress)
        return {"model": engine.model_name, "threads": threads,
                "json_fast_forward": {"off": off, "on": on, "speedup": on["tok_per_s"] / off["tok_per_s"]},
                "speculation": speculation}


def run_generation_bench(model: str | None = None, threads: int = 0, runs: int = 3,
                         progress: Callable[[str], None] = lambda _: None) -> dict:
    return asyncio.run(_run(model, threads_or_cores(threads), runs, progress))


def format_generation_report(r: dict) -> str:
    lines = [f"model {r['model']}, {r['threads']} threads (best of the runs; a shared machine makes these noisy)"]
    ff = r["json_fast_forward"]
    lines.append("json-output, long fixed keys   tokens  passes  forced   tok/s")
    for name in ("off", "on"):
        row = ff[name]
        lines.append(f"  fast-forward {name:<16} {row['tokens']:>6} {row['passes']:>7} {row['forced_tokens']:>7} "
                     f"{row['tok_per_s']:>7.1f}")
    lines.append(f"  speedup {ff['speedup']:.2f}x")
    lines.append(f"greedy, {SPEC_TOKENS} tokens of code       tokens  passes  drafted  accepted   tok/s  speedup  same")
    for name, row in r["speculation"].items():
        extra = f"  {row['speedup']:>6.2f}x  {row['same_output']}" if "speedup" in row else ""
        lines.append(f"  {name:<30} {row['tokens']:>6} {row['passes']:>7} {row['drafted']:>8} {row['accepted']:>9} "
                     f"{row['tok_per_s']:>7.1f}{extra}")
    return "\n".join(lines)
