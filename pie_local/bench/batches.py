"""Forward batches built by hand, the way the driver benchmark and the bare decode loop of the
overhead measurement call the driver (the runtime builds its own from contexts)."""

from __future__ import annotations

import numpy as np

from pie_local.driver import ForwardBatch, SamplingParams

# One request of a batch: (new tokens, ids of the pages that hold its KV, KV length after them).
Request = tuple[list[int], list[int], int]


def greedy_samplers(n: int) -> list[SamplingParams]:
    """The driver's greedy sampler for each of ``n`` output rows; every sampler the benchmarks
    hand the driver is built here."""
    return [SamplingParams()] * n


def forward_batch(requests: list[Request], page_size: int, return_logprobs: bool = False) -> ForwardBatch:
    """One batch over ``requests`` that samples each request's last token greedily."""
    tokens, positions, qo, pages, kv_indptr, last_len, rows = [], [], [0], [], [0], [], []
    for new, req_pages, kv_len in requests:
        tokens += new
        positions += list(range(kv_len - len(new), kv_len))
        qo.append(len(tokens))
        rows.append(len(tokens) - 1)
        pages += req_pages
        kv_indptr.append(len(pages))
        last_len.append(kv_len - (len(req_pages) - 1) * page_size)
    i32 = lambda xs: np.asarray(xs, dtype=np.int32)  # noqa: E731
    return ForwardBatch(
        tokens=i32(tokens), positions=i32(positions), qo_indptr=i32(qo), kv_page_indices=i32(pages),
        kv_page_indptr=i32(kv_indptr), kv_last_page_len=i32(last_len), output_rows=i32(rows),
        samplers=greedy_samplers(len(rows)), return_logprobs=return_logprobs,
    )  # fmt: skip
