"""What the two sides of each benchmark get: the same inputs (token ids where exactness matters)
and the same sampling, so their times compare the same work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pie_local.bench.calculator import call_schema, tool_prompt


# ---------------------------------------------------------------- driver benchmark

def driver_prompt(n: int, n_vocab: int) -> list[int]:
    """The driver benchmark's prompt: a fixed, ordinary-looking token sequence (ids spread over
    the common range of the vocab)."""
    rng = np.random.default_rng(0)
    return [2] + rng.integers(100, min(n_vocab, 20_000), n - 1).tolist()


# ---------------------------------------------------------------- runtime benchmark

@dataclass
class BenchConfig:
    """The runtime benchmark: which model, how many threads, and the size of each workload."""

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


# Sampling of every branch on both sides: llama-cpp-python's defaults (its users' settings; with
# a 262k vocabulary, top_k=0 would make its sampler sort the whole vocabulary every token).
TEMPERATURE, TOP_K, TOP_P, MIN_P = 0.8, 40, 0.95, 0.05


@dataclass
class Workloads:
    """The inputs both sides get (token ids where exactness matters)."""

    shared_prompt: list[int]  # BOS + cfg.prompt_tokens - 1 tokens
    chat_prompts: list[list[int]]
    tot_prompt: list[int]
    tool_prompt: str  # the tool loop's prompt (calculator.py) as text: each side tokenizes its transcript
    call_schema: dict  # of each action in the tool loop


def make_workloads(engine, cfg: BenchConfig) -> Workloads:
    """The runtime benchmark's inputs, tokenized by ``engine``'s tokenizer and chat template."""
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
    return Workloads(shared, chats, tot, tool_prompt(), call_schema())
