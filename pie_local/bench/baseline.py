"""The llama.cpp side of both benchmarks, through llama-cpp-python.

Driver benchmark: its low-level API (`LlamaSide`), one `llama_decode` per step, tokens picked by
numpy argmax over the returned logits, weights loaded with llama.cpp's extra buffer types
(repacked) where the caller's AMX probe allows. Runtime benchmark: its high-level `Llama` with a
prompt cache, requests one after another, the way its users write them, with use_extra_bufts =
False (ggml's AMX weight repacking crashes on CPUs that advertise AMX inside VMs that do not
enable it). llama.cpp's logs go to Python logging as pie-local's do.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from pie_local.bench.calculator import observe
from pie_local.bench.report import tok_per_s
from pie_local.bench.workloads import MIN_P, TEMPERATURE, TOP_K, TOP_P, BenchConfig, Workloads, driver_prompt
from pie_local.llama_logs import route_llama_logs

# ---------------------------------------------------------------- driver benchmark (low-level API)

class LlamaSide:
    """One llama.cpp context with room for ``n_seq`` sequences in a unified KV cache."""

    def __init__(self, path: Path, threads: int, n_ctx: int, n_seq: int, n_batch: int, *,
                 extra_bufts: bool = False) -> None:
        """extra_bufts: llama.cpp's extra buffer types (repacked weights), only where
        machine.extra_bufts_safe() allows (ggml's AMX one faults where the OS refuses AMX)."""
        import llama_cpp

        self.ll = llama_cpp
        route_llama_logs()  # llama.cpp's logs to Python logging, as pie-local does
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.use_extra_bufts = extra_bufts
        # pie's side puts every layer on the GPU when there is one; scripts/gpu_check.sh sets
        # this so llama.cpp's side runs on the same device (0, the CPU, otherwise)
        mp.n_gpu_layers = int(os.environ.get("PIE_LLAMA_GPU_LAYERS", "0"))
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model)))
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, n_seq
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, n_seq)

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)

    def reset(self) -> None:
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)

    def decode(self, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """items: (token, pos, seq_id, want_logits). Greedy token for every item that wants logits."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, int(want)
            b.seq_id[i][0] = seq
        if self.ll.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        out = []
        for i, (_, _, _, want) in enumerate(items):
            if want:
                row = np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                out.append(int(np.argmax(row)))
        return out


def bench_llama(
    path: Path, threads: int, n_prefill: int, n_decode: int, n_streams: int, n_stream_tokens: int,
    extra_bufts: bool = False,
) -> dict[str, float]:
    n_ctx = max(n_prefill, 16 + n_decode) + n_streams * (16 + n_stream_tokens) + 64
    side = LlamaSide(path, threads, n_ctx, max(n_streams, 1), max(n_prefill, 16 * n_streams, 64), extra_bufts=extra_bufts)
    try:
        prompt = driver_prompt(n_prefill, side.n_vocab)
        short = prompt[:16]
        side.decode([(t, i, 0, i == 15) for i, t in enumerate(short)])  # warm-up
        side.reset()

        t = time.perf_counter()
        side.decode([(tok, i, 0, i == n_prefill - 1) for i, tok in enumerate(prompt)])
        prefill = tok_per_s(n_prefill, time.perf_counter() - t)
        side.reset()

        (tok,) = side.decode([(t, i, 0, i == 15) for i, t in enumerate(short)])
        t = time.perf_counter()
        for pos in range(16, 16 + n_decode):
            (tok,) = side.decode([(tok, pos, 0, True)])
        decode = tok_per_s(n_decode, time.perf_counter() - t)
        side.reset()

        toks = side.decode([(tok, i, s, i == 15) for s in range(n_streams) for i, tok in enumerate(prompt[s : s + 16])])
        t = time.perf_counter()
        for pos in range(16, 16 + n_stream_tokens):
            toks = side.decode([(toks[s], pos, s, True) for s in range(n_streams)])
        multi = tok_per_s(n_streams * n_stream_tokens, time.perf_counter() - t)
    finally:
        side.close()
    return {"prefill": prefill, "decode": decode, "decode_multi": multi}


# ---------------------------------------------------------------- runtime benchmark (high-level API)

@contextlib.contextmanager
def no_extra_bufts():
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
    with no_extra_bufts():
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


def llama_workloads(llm, w: Workloads, cfg: BenchConfig) -> dict[str, dict]:
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
            text += f"{action}\nObservation: {observe(action)}\n"
        return n

    timed("best_of", best_of)
    timed("chats", chats)
    timed("tree_of_thought", tree)
    timed("tool_loop", tools)
    return results
