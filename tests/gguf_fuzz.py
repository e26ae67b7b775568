"""Corrupted variants of a tiny GGUF, and a crash-proof way to run pie-local on each of them.

``mutations(path, seed)`` lists seeded edits of a valid file: single-byte flips over the header
(every metadata field, the vocabulary arrays, the tensor infos), edits that break the vocabulary
but keep the file parseable (a changed byte inside a token or merge, two tokens made equal,
absurd token types and scores), absurd counts (header counts, key/string/array lengths, tensor
dims), absurd hyper-parameter values, and truncations.
``run_variants`` applies them one by one in child processes running this file as a script:
each variant goes through `add`, the engine's load (driver, tokenizer, chat template), tokenizing
and detokenizing, and one forward pass. A child that dies takes only its current variant with
it: the parent records a crash for that variant and starts a new child at the next one.

An outcome is "ok" (ran), "refused" (a clear pie-local error), "bug" (any other exception) or
"crash" (the process died: abort, segfault, uncaught C++ exception).
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf

U64_ABSURD = (0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**64 - 1)
U32_ABSURD = (0, 1, 3, 64, 2**16, 2**31 - 1, 2**31, 2**32 - 1)
F32_ABSURD = (float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e-45, 3e38)


@dataclass(frozen=True)
class Mutation:
    kind: str  # "flip" (xor one byte), "truncate", "write" (pack a value at an offset)
    offset: int
    xor: int = 0  # flip
    fmt: str = ""  # write: struct format of the value ("<I", "<f", "5s", ...)
    value: float | int | str = 0  # write (bytes as hex)
    note: str = ""  # what was hit, for the failure report

    def apply(self, data: bytes) -> bytes:
        if self.kind == "truncate":
            return data[: self.offset]
        out = bytearray(data)
        if self.kind == "flip":
            out[self.offset] ^= self.xor
        else:
            value = bytes.fromhex(self.value) if self.fmt.endswith("s") else self.value  # type: ignore[arg-type]
            struct.pack_into(self.fmt, out, self.offset, value)
        return bytes(out)


@dataclass(frozen=True)
class _Part:
    offset: int
    size: int
    field: str
    role: str  # "count" (a length or dimension), "scalar", "data"


def _layout(path: Path) -> tuple[list[_Part], int]:
    """Every part of the header with its byte offset, and where the tensor data starts."""
    reader = gguf.GGUFReader(str(path))
    parts: list[_Part] = []

    def walk(name: str, offset: int, sizes: list[int], roles: list[str]) -> None:
        for size, role in zip(sizes, roles):
            parts.append(_Part(offset, size, name, role))
            offset += size

    for name, field in reader.fields.items():
        sizes = [p.nbytes for p in field.parts]
        if name.startswith("GGUF."):
            walk(name, field.offset, sizes, ["count" if name != "GGUF.version" else "scalar"])
            continue
        roles = ["count", "data", "scalar"]  # key length, key, value type
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            roles += ["scalar", "count"]  # element type, length
            if field.types[-1] == gguf.GGUFValueType.STRING:
                roles += ["count", "data"] * ((len(sizes) - 5) // 2)
            else:
                roles += ["data"] * (len(sizes) - 5)
        elif field.types[0] == gguf.GGUFValueType.STRING:
            roles += ["count", "data"]
        else:
            roles += ["scalar"]
        walk(name, field.offset, sizes, roles)
    for t in reader.tensors:
        sizes = [p.nbytes for p in t.field.parts]  # name length, name, n_dims, dims, type, offset
        walk(f"tensor {t.name}", t.field.offset, sizes, ["count", "data", "count", "count", "scalar", "scalar"])
    return parts, reader.data_offset


VOCAB_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def mutations(path: Path, seed: int, flips: int = 100, vocab: int = 100, counts: int = 50, values: int = 30,
              truncations: int = 20) -> list[Mutation]:
    """Seeded edits of the GGUF at `path` (the same seed gives the same list)."""
    rng = random.Random(seed)
    parts, data_offset = _layout(path)
    size = path.stat().st_size
    fields = sorted({p.field for p in parts})
    out: list[Mutation] = []
    data = path.read_bytes()

    for i in range(flips):  # half: a random field, then a byte in it; half: any header byte
        if i % 2:
            name = rng.choice(fields)
            part = rng.choice([p for p in parts if p.field == name])
            offset, note = part.offset + rng.randrange(part.size), name
        else:
            offset = rng.randrange(data_offset)
            note = next((p.field for p in parts if p.offset <= offset < p.offset + p.size), "padding")
        out.append(Mutation("flip", offset, xor=rng.randrange(1, 256), note=note))

    out += _vocab_edits(rng, parts, data, vocab)

    count_parts = [p for p in parts if p.role == "count"]
    for _ in range(counts):
        part = rng.choice(count_parts)
        fmt, absurd = ("<Q", U64_ABSURD) if part.size == 8 else ("<I", U32_ABSURD)
        out.append(Mutation("write", part.offset, fmt=fmt, value=rng.choice(absurd), note=f"{part.field} count"))

    scalars = [p for p in parts if p.role == "scalar" and p.size == 4 and not p.field.startswith(("GGUF.", "tensor "))]
    for _ in range(values):
        part = rng.choice(scalars)
        if rng.random() < 0.5:
            fmt, value = "<f", rng.choice(F32_ABSURD)
        else:
            fmt, value = "<I", rng.choice(U32_ABSURD)
        out.append(Mutation("write", part.offset, fmt=fmt, value=value, note=f"{part.field} value"))

    cuts = [rng.randrange(data_offset) for _ in range(truncations * 3 // 4)]
    cuts += [rng.randrange(data_offset, size) for _ in range(truncations - len(cuts))]
    out += [Mutation("truncate", c, note="truncated") for c in cuts]
    return out


def _vocab_edits(rng: random.Random, parts: list[_Part], data: bytes, n: int) -> list[Mutation]:
    """Edits that keep the file parseable but break the vocabulary: a byte changed inside a token
    or merge (an invalid, renamed or colliding string), a token made equal to another of the same
    length, absurd token types and scores."""
    texts = [p for p in parts if p.field in VOCAB_ARRAYS and p.role == "data" and p.size > 0]
    strings = [p for p in texts if p.field in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")]
    by_size: dict[int, list[_Part]] = {}
    for p in strings:
        if p.field == "tokenizer.ggml.tokens":
            by_size.setdefault(p.size, []).append(p)
    same_size = [group for group in by_size.values() if len(group) > 1]
    types = [p for p in texts if p.field == "tokenizer.ggml.token_type"]
    scores = [p for p in texts if p.field == "tokenizer.ggml.scores"]
    out: list[Mutation] = []
    for i in range(n):
        pick = i % 4
        if pick == 0 and strings:
            p = rng.choice(strings)
            out.append(Mutation("flip", p.offset + rng.randrange(p.size), xor=rng.randrange(1, 256), note=f"{p.field} text"))
        elif pick == 1 and same_size:
            a, b = rng.sample(rng.choice(same_size), 2)
            out.append(Mutation("write", b.offset, fmt=f"{a.size}s", value=data[a.offset : a.offset + a.size].hex(),
                                note="two tokens made equal"))
        elif pick == 2 and types:
            p = rng.choice(types)
            out.append(Mutation("write", p.offset, fmt="<i", value=rng.choice((-1, 0, 2, 3, 4, 5, 6, 7, 1000)),
                                note="token type"))
        elif scores:
            p = rng.choice(scores)
            out.append(Mutation("write", p.offset, fmt="<f", value=rng.choice(F32_ABSURD), note="token score"))
        elif types:
            p = rng.choice(types)
            out.append(Mutation("write", p.offset, fmt="<i", value=6, note="token type"))
    return out


# ---------------------------------------------------------------------------------------------
# Running the variants (parent side)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    index: int
    result: str  # "ok", "refused", "bug", "crash"
    detail: str


def run_variants(base: Path, muts: list[Mutation], workdir: Path, checked: bool = True,
                 timeout: float = 120.0) -> list[Outcome]:
    """Runs every mutation of `base` in child processes; returns one Outcome per mutation.
    checked=False runs `unchecked` instead of `exercise` (to show the harness sees crashes)."""
    specs = workdir / "mutations.json"
    specs.write_text(json.dumps([asdict(m) for m in muts]))
    env = _child_env(os.environ, PIE_LOCAL_HOME=str(workdir / "home"))
    outcomes: dict[int, Outcome] = {}
    start = 0
    while start < len(muts):
        proc = subprocess.run([sys.executable, __file__, "variants" if checked else "unchecked-variants",
                               str(base), str(specs), str(workdir), str(start)],
                              capture_output=True, text=True, env=env, timeout=timeout)
        current = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if "result" in event:
                outcomes[event["index"]] = Outcome(event["index"], event["result"], event["detail"])
                current = None
            else:
                current = event["index"]
        if proc.returncode == 0 and current is None:
            break
        if current is None:  # died between variants: blame the next one (the last, if it died at exit)
            current = min(max(outcomes, default=start - 1) + 1, len(muts) - 1)
        tail = proc.stderr.strip().splitlines()[-3:]
        outcomes[current] = Outcome(current, "crash", f"exit {proc.returncode}: {' | '.join(tail)}")
        start = current + 1
    return [outcomes[i] for i in range(len(muts))]


# ---------------------------------------------------------------------------------------------
# One variant (child side)
# ---------------------------------------------------------------------------------------------

PROMPT = "Hello, World! the world is good\n\tünïcödé 😀 <s></s><|im_end|> \x00\x7f"


def exercise(path: Path, name: str) -> None:
    """What `pie-local add` then `run` do with a file, condensed: register, load, tokenize, one
    forward pass, detokenize. Raises on any failure."""
    from pie_local.models.store import add
    from pie_local.runtime.engine import Engine, EngineConfig

    add(path, name=name)
    engine = Engine(name, EngineConfig(driver=_params()))
    engine.load()
    try:
        tok = engine.tokenizer
        ids = tok.encode(PROMPT, add_special=True)[:48] or [0]
        tok.decode(ids)
        for t in range(tok.n_vocab):
            tok.piece(t)
        engine.chat_template.render([{"role": "user", "content": "hi"}])
        tok.llguidance_tokenizer()  # what constrained generation builds from the vocabulary
        sampled = _forward_once(engine.driver, ids)
        tok.decode([t for t in sampled if 0 <= t < tok.n_vocab])
    finally:
        engine.driver.close()
        engine.tokenizer.close()


def unchecked(path: Path) -> None:
    """The same steps straight on llama.cpp and the driver, skipping pie-local's file checks:
    what a file did before them (regression tests show it really crashed this)."""
    from pie_local.driver import Driver
    from pie_local.models.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(path, check=False)
    ids = tok.encode(PROMPT, add_special=True)[:48] or [0]
    with Driver(path, _params()) as driver:
        _forward_once(driver, ids)


def run_unchecked(path: Path) -> int:
    """unchecked(path) in a child process; its exit status (negative: killed by that signal)."""
    return subprocess.run([sys.executable, __file__, "unchecked", str(path)], capture_output=True,
                          env=_child_env(os.environ), timeout=120).returncode


def _params():  # -> DriverParams: small and single-threaded
    from pie_local.driver.types import DriverParams

    return DriverParams(n_threads=1, page_size=16, n_pages=4)


def _forward_once(driver, ids: list[int]) -> list[int]:
    """One prefill of `ids` (at most 64) in a fresh sequence; the greedy next token."""
    import numpy as np

    from pie_local.driver.types import ForwardBatch, SamplingParams

    n = len(ids)
    pages = (n + 15) // 16
    i32 = lambda xs: np.asarray(xs, dtype=np.int32)  # noqa: E731
    batch = ForwardBatch(tokens=i32(ids), positions=i32(range(n)), qo_indptr=i32([0, n]),
                         kv_page_indices=i32(range(pages)), kv_page_indptr=i32([0, pages]),
                         kv_last_page_len=i32([n - 16 * (pages - 1)]), output_rows=i32([n - 1]),
                         samplers=[SamplingParams()])
    return [int(t) for t in driver.forward(batch).tokens]


def _child_env(base: dict[str, str], **extra: str) -> dict[str, str]:
    """This checkout importable; no gdb backtrace from ggml when a child aborts (it takes seconds)."""
    repo = Path(__file__).resolve().parent.parent
    pythonpath = os.pathsep.join(p for p in (str(repo), base.get("PYTHONPATH")) if p)
    return dict(base, PYTHONPATH=pythonpath, GGML_NO_BACKTRACE="1", **extra)


def _clear_errors() -> tuple[type[BaseException], ...]:
    from pie_local.driver.types import DriverError
    from pie_local.models.chat_template import ChatTemplateError
    from pie_local.models.errors import ModelError
    from pie_local.models.tokenizer import TokenizerError

    return ModelError, TokenizerError, DriverError, ChatTemplateError


def _child(checked: bool, base: Path, specs: Path, workdir: Path, start: int) -> None:
    import traceback

    data = base.read_bytes()
    muts = [Mutation(**m) for m in json.loads(specs.read_text())]
    clear = _clear_errors()
    for i in range(start, len(muts)):
        print(json.dumps({"index": i}), flush=True)
        path = workdir / f"variant-{i}.gguf"
        path.write_bytes(muts[i].apply(data))
        try:
            exercise(path, f"variant-{i}") if checked else unchecked(path)
            result, detail = "ok", ""
        except clear as exc:
            result, detail = "refused", f"{type(exc).__name__}: {exc}"
        except BaseException:  # a Rust panic from llguidance is a BaseException
            result, detail = "bug", traceback.format_exc(limit=4)
        path.unlink()
        print(json.dumps({"index": i, "result": result, "detail": detail}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "unchecked":
        unchecked(Path(sys.argv[2]))
    else:
        _child(sys.argv[1] == "variants", Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]))
