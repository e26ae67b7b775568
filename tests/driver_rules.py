"""The rules every driver enforces on a batch: one list, run against the native driver
(test_driver_errors.py) and FakeDriver (test_driver_rules.py), so the fake rejects exactly what
the C driver rejects, with the same messages.

Each case starts from a valid request that would overwrite pages 0 and 1 of a live sequence
(PROMPT in pages 0-2), so a case that got past validation would be seen corrupting it."""

from __future__ import annotations

import dataclasses

import numpy as np
from driver_helpers import Req, build_batch

__all__ = ["BAD_BATCHES", "DECODE", "NAN_TOKEN", "PAGE", "PARAMS", "POISONED_ROW_ERROR", "PROMPT", "Req",
           "poisoned_batch", "unchecked_sampler", "with_batch"]

from pie_local.driver import DriverParams, ForwardBatch, SamplingParams

PAGE = 4
MAX_TOKENS = 32
N_PAGES = 16
PARAMS = DriverParams(n_threads=2, page_size=PAGE, n_pages=N_PAGES, max_batch_tokens=MAX_TOKENS)


def unchecked_sampler(**fields) -> SamplingParams:
    """A SamplingParams that skips Python's validation, to show the driver checks on its own."""
    sampler = object.__new__(SamplingParams)
    for name, value in {**dataclasses.asdict(SamplingParams()), **fields}.items():
        object.__setattr__(sampler, name, value)
    return sampler


PROMPT = [1, 300, 301, 302, 303, 304, 305, 306, 307, 308]  # pages 0, 1, 2 (2 tokens in page 2)
DECODE = Req([309], [0, 1, 2], len(PROMPT) + 1, outputs=[0])


def clobber() -> Req:
    """A valid request that would overwrite pages 0 and 1 with other tokens."""
    return Req([1, 5, 6, 7, 8, 9, 10, 11], [0, 1], 8, outputs=[7])


def with_batch(req: Req | None = None, **changes):
    batch = build_batch([req or clobber()], PAGE)
    return dataclasses.replace(batch, **changes)


def i32(*xs: int) -> np.ndarray:
    return np.asarray(xs, dtype=np.int32)


# name -> (make(n_vocab) -> bad ForwardBatch, fragment of the expected message)
BAD_BATCHES = {
    "page_id_out_of_range": (
        lambda v: with_batch(Req([1, 5, 6, 7, 8], [0, N_PAGES + 3], 5)),
        f"page id {N_PAGES + 3} out of range (n_pages={N_PAGES})",
    ),
    "negative_page_id": (lambda v: with_batch(Req([1, 5], [-1], 2)), "page id -1 out of range"),
    "mask_runs_do_not_sum_to_kv_len": (
        lambda v: with_batch(Req([1, 5, 6], [0], 3, masks=[None, None, [0, 2]])),
        "mask runs sum to 2 but the request's KV length is 3",
    ),
    "mask_hides_every_key": (  # the token would attend to nothing (ggml would return zeros)
        lambda v: with_batch(Req([1, 5, 6], [0], 3, masks=[None, None, [3]])),
        "token 2: its mask hides every KV row, its own included",
    ),
    "mask_shows_only_later_rows": (  # token 0 sees only row 1, which causality hides from it
        lambda v: with_batch(Req([1, 5, 6], [0], 3, masks=[[1, 1, 1], None, None])),
        "token 0: its mask hides every KV row, its own included",
    ),
    "mask_indptr_wrong_length": (
        lambda v: with_batch(mask_indptr=i32(0, 0), mask_runs=i32()),
        "mask_indptr has 2 entries",
    ),
    "too_many_tokens": (
        lambda v: with_batch(Req(list(range(3, 3 + MAX_TOKENS + 1)), list(range(9)), MAX_TOKENS + 1)),
        f"batch has {MAX_TOKENS + 1} tokens; max_batch_tokens is {MAX_TOKENS}",
    ),
    "token_id_out_of_range": (lambda v: with_batch(Req([1, 5, 100_000], [0], 3)), "id 100000 out of range (n_vocab="),
    "last_page_len_zero": (lambda v: with_batch(kv_last_page_len=i32(0)), "last_page_len 0 outside 1..4"),
    "last_page_len_too_big": (lambda v: with_batch(kv_last_page_len=i32(5)), "last_page_len 5 outside 1..4"),
    "kv_shorter_than_new_tokens": (
        lambda v: with_batch(Req([1, 5, 6, 7, 8, 9], [0], 4, positions=list(range(6)))),
        "KV length 4 is shorter than its 6 new tokens",
    ),
    "page_listed_twice": (lambda v: with_batch(Req([1, 5, 6, 7, 8], [0, 0], 5)), "page 0 listed twice"),
    "output_row_out_of_range": (lambda v: with_batch(output_rows=i32(8)), "row 8 out of range (batch has 8 tokens)"),
    "qo_indptr_not_ending_at_n_tokens": (lambda v: with_batch(qo_indptr=i32(0, 7)), "qo_indptr ends at 7"),
    "top_p_zero": (
        lambda v: with_batch(samplers=[unchecked_sampler(temperature=1.0, top_p=0.0)]),
        "top_p must be in (0, 1]",
    ),
    "min_p_above_one": (
        lambda v: with_batch(samplers=[unchecked_sampler(temperature=1.0, min_p=2.0)]),
        "min_p must be in [0, 1]",
    ),
    "negative_top_k": (lambda v: with_batch(samplers=[unchecked_sampler(temperature=1.0, top_k=-3)]), "top_k must be >= 0"),
    "nan_temperature": (
        lambda v: with_batch(samplers=[unchecked_sampler(temperature=float("nan"))]),
        "temperature must be finite",
    ),
    "negative_position": (
        lambda v: with_batch(positions=np.asarray([0, 1, 2, -1, 4, 5, 6, 7], dtype=np.int32)),
        "token 3: negative position -1",
    ),
    "batch_kv_over_max_batch_kv": (  # two requests reading 10 pages each: 80 KV rows > 16 pages * 4
        lambda v: build_batch([Req([5], list(range(10)), 40), Req([6], list(range(9)) + [10], 40)], PAGE),
        f"batch attends over 80 KV rows; max_batch_kv is {N_PAGES * PAGE}",
    ),
    "request_reads_kv_another_writes": (  # request 1's KV includes page 0, which request 0 fills now
        lambda v: build_batch([Req([1, 5, 6, 7], [0], 4), Req([9], [0, 1], 5)], PAGE),
        "request 1 reads KV slot 0 of page 0, which request 0 writes in this batch",
    ),
    "logit_mask_allows_nothing": (
        lambda v: with_batch(logit_masks=np.zeros((1, (v + 31) // 32), dtype=np.uint32)),
        "allows no token",
    ),
}




# A token whose embedding is NaN (tiny_models writes one, FakeDriver(nan_tokens=...) fakes one): a
# row that sees it has NaN logits and cannot be sampled; it must fail alone.
NAN_TOKEN = 250


def poisoned_batch(rows_fail_alone: bool = True) -> ForwardBatch:
    """Request 0 sees NAN_TOKEN, request 1 (greedy) and request 2 (sampled) do not."""
    batch = build_batch(
        [Req([1, NAN_TOKEN, 7], [4], 3), Req([1, 8, 9], [5], 3),
         Req([1, 10, 11], [6], 3, samplers=[SamplingParams(temperature=0.8, seed=3)])],
        PAGE,
    )
    return dataclasses.replace(batch, rows_fail_alone=rows_fail_alone)


POISONED_ROW_ERROR = "output 0: every logit is -inf or NaN"
