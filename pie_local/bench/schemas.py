"""Real-world JSON schemas (JSONSchemaBench): how many compile, whether every finished output
validates and keeps its keys unique, and what the mask costs per token.

    cases = load_cases(path)                  # tests/data/jsonschemabench/schemas.jsonl in the repository
    compiled = compile_cases(cases)           # JsonSchema with its default options, or why not
    picked = sample(compiled, per_collection=4, seed=0)
    outputs = await generate(engine, picked, max_tokens=192)    # or random_outputs(picked, tokenizer)
    print(format_report(summarize(compiled, outputs)))

An output is checked with `jsonschema` under the schema's own `$schema` draft (2020-12 when it
names none). A keyword the constraint relaxed (`JsonSchema.relaxed`) may be broken; any other
error is a defect, and so is a repeated key. Formats are not asserted (jsonschema's default).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pie_local.runtime.constraints import (Constraint, ConstraintError, ConstraintState, JsonSchema,
                                           allowed_tokens)
from pie_local.runtime.json_keys import TokenSet, vocab_quotes
from pie_local.runtime.sampling import SamplingParams


@dataclass(frozen=True)
class Case:
    id: str  # e.g. "Github_easy/o19980"
    collection: str  # Github, Glaiveai2K, JsonSchemaStore, Kubernetes, Snowplow, WashingtonPost
    schema: dict


def load_cases(path: str | Path) -> list[Case]:
    """One schema per line: {"collection", "id", "schema", ...}."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Case(r["id"], r["collection"], r["schema"]) for r in rows]


@dataclass
class Compiled:
    case: Case
    constraint: JsonSchema | None  # None when it did not compile
    error: str = ""
    seconds: float = 0.0


def compile_cases(cases: list[Case], **options: Any) -> list[Compiled]:
    """JsonSchema(schema, **options) for each case, timed."""
    out = []
    for case in cases:
        start = time.perf_counter()
        try:
            out.append(Compiled(case, JsonSchema(case.schema, **options)))
        except ConstraintError as e:
            out.append(Compiled(case, None, str(e)))
        out[-1].seconds = time.perf_counter() - start
    return out


def sample(compiled: list[Compiled], per_collection: int, seed: int = 0) -> list[Compiled]:
    """The same `per_collection` compiled schemas of each collection for the same seed."""
    by_collection: dict[str, list[Compiled]] = {}
    for c in compiled:
        if c.constraint is not None:
            by_collection.setdefault(c.case.collection, []).append(c)
    picked = []
    for name in sorted(by_collection):
        items = sorted(by_collection[name], key=lambda c: c.case.id)
        picked += random.Random(f"{seed}:{name}").sample(items, min(per_collection, len(items)))
    return picked


# ---- checking an output -------------------------------------------------------------------------

@dataclass
class Check:
    parsed: bool = False
    repeated_keys: list[str] = field(default_factory=list)
    error_keywords: list[str] = field(default_factory=list)  # the schema keyword of each validation error
    unexplained: list[str] = field(default_factory=list)  # errors on keywords that were not relaxed
    unresolvable: str = ""  # a $ref jsonschema could not follow (nothing validated)


def check_output(text: str, constraint: JsonSchema) -> Check:
    import jsonschema
    import referencing.exceptions

    check = Check()
    repeated: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict:
        keys = [k for k, _ in items]
        repeated.extend(sorted({k for k in keys if keys.count(k) > 1}))
        return dict(items)

    try:
        value = json.loads(text, object_pairs_hook=pairs)
    except ValueError:
        return check
    check.parsed, check.repeated_keys = True, repeated
    cls = jsonschema.validators.validator_for(constraint.schema, default=jsonschema.Draft202012Validator)
    try:
        errors = list(cls(constraint.schema).iter_errors(value))
    except referencing.exceptions.Unresolvable as e:
        check.unresolvable = str(e)
        return check
    for error in errors:
        path = {str(p) for p in error.schema_path}  # an error under if/then/not/... names them here
        check.error_keywords.append(str(error.validator))
        if not path & set(constraint.relaxed):
            check.unexplained.append(f"{error.validator}: {error.message[:200]}")
    return check


# ---- producing outputs --------------------------------------------------------------------------

@dataclass
class Output:
    id: str
    collection: str
    text: str
    finished: bool  # the constraint completed (else max_tokens or a dead end cut it)
    tokens: int
    mask_seconds: list[float]
    check: Check
    failure: str = ""  # a ConstraintError that stopped it


class TimedConstraint(Constraint):
    """A constraint whose states record how long each mask() takes."""

    def __init__(self, inner: Constraint) -> None:
        self.inner = inner
        self.mask_seconds: list[float] = []

    def bind(self, tokenizer: Any) -> ConstraintState:
        return _TimedState(self.inner.bind(tokenizer), self.mask_seconds)


class _TimedState(ConstraintState):
    def __init__(self, inner: ConstraintState, seconds: list[float]) -> None:
        self.inner, self.seconds, self.n_vocab = inner, seconds, inner.n_vocab

    def mask(self) -> np.ndarray:
        start = time.perf_counter()
        try:
            return self.inner.mask()
        finally:
            self.seconds.append(time.perf_counter() - start)

    def advance(self, token_id: int) -> None:
        self.inner.advance(token_id)

    def is_done(self) -> bool:
        return self.inner.is_done()

    def is_accepting(self) -> bool:
        return self.inner.is_accepting()

    def fork(self) -> ConstraintState:
        return _TimedState(self.inner.fork(), self.seconds)

    def rollback(self, n_tokens: int) -> None:
        self.inner.rollback(n_tokens)


def prompt_for(case: Case) -> str:
    """A short prompt: the schema itself can be tens of thousands of tokens."""
    title = case.schema.get("title") or case.schema.get("description") or ""
    about = f" ({str(title)[:80]})" if title else ""
    return f"An example JSON document{about}:\n"


async def generate(engine: Any, items: list[Compiled], max_tokens: int = 192, temperature: float = 0.0,
                   seed: int = 0, concurrency: int = 8) -> list[Output]:
    """Each schema's output on the engine's model, `concurrency` generations batched together."""
    gate = asyncio.Semaphore(concurrency)

    async def one(item: Compiled) -> Output:
        timed = TimedConstraint(item.constraint)
        async with gate:
            ctx = engine.context()
            try:
                ctx.fill(prompt_for(item.case))
                sampling = SamplingParams(temperature=temperature, seed=seed)
                failure = ""
                try:
                    await ctx.generate(sampling, max_tokens=max_tokens, constrain=timed)
                except ConstraintError as e:
                    failure = str(e)
                last = ctx.last
                finished = not failure and last.finish_reason == "stop"
                return Output(item.case.id, item.case.collection, last.text, finished, len(last.token_ids),
                              timed.mask_seconds, check_output(last.text, item.constraint) if finished else Check(),
                              failure)
            finally:
                ctx.release()

    return list(await asyncio.gather(*(one(item) for item in items)))


def random_outputs(items: list[Compiled], tokenizer: Any, max_tokens: int = 256, seed: int = 0) -> list[Output]:
    """An adversarial 'model': each token drawn among those the mask allows, half the time from
    short ones that close something (a quote, bracket or comma: so it gets somewhere), and the end
    of generation, once allowed, with probability 1/2. Whatever it writes must validate."""
    eos = sorted(tokenizer.eos_ids)
    pieces = vocab_quotes(tokenizer.llguidance_tokenizer()).pieces
    closers = TokenSet.of(np.array([len(piece) <= 2 and any(c in piece for c in b'"]},') for piece in pieces]))
    out = []
    for i, item in enumerate(items):
        rng = np.random.default_rng([seed, i])
        timed = TimedConstraint(item.constraint)
        state = timed.bind(tokenizer)
        tokens: list[int] = []
        failure = ""
        try:
            for _ in range(max_tokens):
                mask = state.mask()
                ends = [t for t in eos if mask[t >> 5] >> (t & 31) & 1]
                closing = closers.allowed(mask) if rng.random() < 0.5 else []
                if ends and rng.random() < 0.5:
                    token = int(rng.choice(ends))
                else:
                    token = int(rng.choice(closing or allowed_tokens(mask)))
                state.advance(token)
                if token in tokenizer.eos_ids:
                    break
                tokens.append(token)
        except ConstraintError as e:
            failure = str(e)
        text = tokenizer.decode(tokens)
        finished = not failure and state.is_done()
        out.append(Output(item.case.id, item.case.collection, text, finished, len(tokens), timed.mask_seconds,
                          check_output(text, item.constraint) if finished else Check(), failure))
    return out


# ---- the report ---------------------------------------------------------------------------------

def summarize(compiled: list[Compiled], outputs: list[Output]) -> dict[str, Any]:
    """Compile rate (overall, per collection), what was relaxed, and for the outputs: finished,
    valid, valid but for relaxed keywords, unexplained errors, repeated keys, mask cost."""
    ok = [c for c in compiled if c.constraint is not None]
    collections = sorted({c.case.collection for c in compiled})
    relaxed: dict[str, int] = {}
    for c in ok:
        for keyword in c.constraint.relaxed:
            relaxed[keyword] = relaxed.get(keyword, 0) + 1
    finished = [o for o in outputs if o.finished]
    masks = [s for o in outputs for s in o.mask_seconds]
    return {
        "schemas": len(compiled),
        "compiled": len(ok),
        "compile_rate": len(ok) / len(compiled) if compiled else 0.0,
        "compiled_by_collection": {name: f"{sum(c.case.collection == name for c in ok)}/"
                                         f"{sum(c.case.collection == name for c in compiled)}" for name in collections},
        "relaxed_schemas": sum(bool(c.constraint.relaxed) for c in ok),
        "relaxed_keywords": dict(sorted(relaxed.items(), key=lambda kv: -kv[1])),
        "compile_ms_median": 1000 * statistics.median(c.seconds for c in ok) if ok else 0.0,
        "compile_ms_max": 1000 * max((c.seconds for c in ok), default=0.0),
        "not_compiled": {c.case.id: c.error.splitlines()[0][:160] for c in compiled if c.constraint is None},
        "outputs": len(outputs),
        "finished": len(finished),
        "stopped_by_constraint_error": {o.id: o.failure[:160] for o in outputs if o.failure},
        "parsed": sum(o.check.parsed for o in finished),
        "valid": sum(o.check.parsed and not o.check.error_keywords and not o.check.unresolvable for o in finished),
        "valid_but_relaxed": sum(o.check.parsed and bool(o.check.error_keywords) and not o.check.unexplained
                                 for o in finished),
        "unexplained_errors": {o.id: o.check.unexplained for o in finished if o.check.unexplained},
        "unresolvable_refs": sum(bool(o.check.unresolvable) for o in finished),
        "repeated_keys": {o.id: o.check.repeated_keys for o in finished if o.check.repeated_keys},
        "tokens": sum(o.tokens for o in outputs),
        "mask_calls": len(masks),
        "mask_us_median": 1e6 * statistics.median(masks) if masks else 0.0,
        "mask_us_p90": 1e6 * float(np.percentile(masks, 90)) if masks else 0.0,
        "mask_us_mean": 1e6 * statistics.fmean(masks) if masks else 0.0,
    }


def format_report(r: dict[str, Any]) -> str:
    lines = [f"compiled {r['compiled']}/{r['schemas']} ({100 * r['compile_rate']:.1f}%), "
             f"{r['relaxed_schemas']} with relaxed keywords; compile median {r['compile_ms_median']:.1f} ms, "
             f"max {r['compile_ms_max']:.0f} ms",
             "  by collection: " + ", ".join(f"{k} {v}" for k, v in r["compiled_by_collection"].items()),
             "  relaxed: " + (", ".join(f"{k} {v}" for k, v in r["relaxed_keywords"].items()) or "none")]
    for name, error in r["not_compiled"].items():
        lines.append(f"  not compiled: {name}: {error}")
    if r["outputs"]:
        lines += [f"outputs {r['outputs']}: finished {r['finished']}, parsed {r['parsed']}, valid {r['valid']}, "
                  f"valid but for relaxed keywords {r['valid_but_relaxed']}, "
                  f"unexplained errors {len(r['unexplained_errors'])}, repeated keys {len(r['repeated_keys'])}, "
                  f"unresolvable refs {r['unresolvable_refs']}, stopped by a constraint error "
                  f"{len(r['stopped_by_constraint_error'])}",
                  f"mask per token: median {r['mask_us_median']:.0f} us, p90 {r['mask_us_p90']:.0f} us, "
                  f"mean {r['mask_us_mean']:.0f} us over {r['mask_calls']} calls ({r['tokens']} tokens)"]
        for name, errors in r["unexplained_errors"].items():
            lines.append(f"  unexplained: {name}: {errors[0]}")
        for name, keys in r["repeated_keys"].items():
            lines.append(f"  repeated keys: {name}: {keys}")
        for name, error in r["stopped_by_constraint_error"].items():
            lines.append(f"  constraint error: {name}: {error}")
    return "\n".join(lines)
