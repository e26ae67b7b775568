"""Attention groups: requests whose KV starts with the same pages attend in one call.

Consecutive decode-sized requests of a batch whose first run of pages is the same (forks of one
prefix, clients of one cached system prompt) attend over one KV: the shared rows once, then each
member's own rows, each member's mask hiding the others' (pie_plan_group in internal.h). Their
results must be exactly what each request gets alone, and what it gets with its KV in one run of
consecutive pages; a lone decode query over a long KV (which ggml would split over the threads)
is given a dummy second row so it takes the same kernel as a grouped one. These comparisons are
exact: the kernel skips hidden rows without a trace. Every test runs on both attention kernels:
the driver's own (attention_cpu.c, reading the pool in place) and ggml's flash attention over
the group's copied runs (own_kernels off).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from driver_helpers import Req, build_batch, tiny_gguf

from pie_local.driver import Driver, DriverParams

pytestmark = pytest.mark.real_driver

PAGE = 8


class Forks:
    """A prompt prefilled once, then forks decoding from it, each with its own pages."""

    def __init__(self, drv: Driver, prompt: list[int], own_pages: list[list[int]]) -> None:
        self.drv = drv
        n_full = len(prompt) // PAGE
        self.shared = list(range(n_full))  # full pages of the prompt, shared by every fork
        tail = len(prompt) - n_full * PAGE
        prefill_pages = self.shared + ([n_full] if tail else [])
        drv.forward(build_batch([Req(prompt, prefill_pages, len(prompt))], PAGE))
        self.kv = len(prompt)
        self.own = own_pages
        if tail:  # each fork's copy of the partial last page (copy on write), its first own page
            drv.copy_pages([n_full] * len(own_pages), [pages[0] for pages in own_pages])

    def req(self, fork: int, tokens: list[int], mask: list[int] | None = None) -> Req:
        kv = self.kv + len(tokens)
        n_pages = -(-kv // PAGE)
        pages = (self.shared + self.own[fork])[:n_pages]
        masks = [mask] * len(tokens) if mask is not None else None
        return Req(tokens, pages, kv, masks=masks, outputs=list(range(len(tokens))))

    def step(self, reqs: list[Req]) -> np.ndarray:
        return self.drv.forward(build_batch(reqs, PAGE)).logits


def params(own_kernels: bool, n_pages: int = 256, **kw) -> DriverParams:
    return DriverParams(n_threads=2, page_size=PAGE, n_pages=n_pages, own_kernels=own_kernels, **kw)


@pytest.fixture(params=[True, False], ids=["own-attention", "ggml-attention"])
def own_kernels(request) -> bool:
    return request.param


def fork_runs(path: Path, prompt: list[int], own: list[list[int]], steps: list[list[list[int]]],
              together: bool, own_kernels: bool) -> list[np.ndarray]:
    """Every fork's logits at every step, the forks in one batch per step or each alone."""
    with Driver(path, params(own_kernels, n_pages=512, max_batch_tokens=1024)) as drv:
        forks = Forks(drv, prompt, own)
        out: list[list[np.ndarray]] = [[] for _ in own]
        for step in steps:
            reqs = [forks.req(f, toks) for f, toks in enumerate(step)]
            if together:
                logits = forks.step(reqs)
                at = 0
                for f, toks in enumerate(step):
                    out[f].append(logits[at : at + len(toks)])
                    at += len(toks)
            else:
                for f, r in enumerate(reqs):
                    out[f].append(forks.step([r]))
            forks.kv += len(step[0])
        return [np.concatenate(x) for x in out]


def own_pages(n_forks: int, start: int, per: int, interleave: bool) -> list[list[int]]:
    """Each fork's own pages: in blocks of their own, or interleaved with its siblings' (several runs)."""
    if interleave:
        return [[start + f + n_forks * i for i in range(per)] for f in range(n_forks)]
    return [list(range(start + f * per, start + (f + 1) * per)) for f in range(n_forks)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_gguf(tmp_path_factory, "llama")


@pytest.mark.parametrize("interleave", [False, True], ids=["own-blocks", "interleaved"])
def test_forks_together_equal_each_alone(tiny: Path, interleave: bool, own_kernels: bool) -> None:
    rng = np.random.default_rng(3)
    prompt = rng.integers(3, 500, 45).tolist()  # 5 full pages + a tail of 5
    own = own_pages(5, 100, 6, interleave)
    # decode steps, then a step where forks verify drafts of different lengths
    steps = [[[int(t)] for t in rng.integers(3, 500, 5)] for _ in range(4)]
    steps.append([rng.integers(3, 500, 3).tolist() for _ in range(5)])
    together = fork_runs(tiny, prompt, own, steps, together=True, own_kernels=own_kernels)
    alone = fork_runs(tiny, prompt, own, steps, together=False, own_kernels=own_kernels)
    for f in range(5):
        assert np.array_equal(together[f], alone[f]), f
    assert not np.allclose(together[0], together[1])  # different tokens, different logits


def test_forks_equal_the_same_sequence_in_consecutive_pages(tiny: Path, own_kernels: bool) -> None:
    rng = np.random.default_rng(4)
    prompt = rng.integers(3, 500, 45).tolist()
    steps = [[[int(t)] for t in rng.integers(3, 500, 4)] for _ in range(3)]
    grouped = fork_runs(tiny, prompt, own_pages(4, 100, 5, True), steps, together=True, own_kernels=own_kernels)
    for f in range(4):  # fork f's whole sequence, prompt included, alone in pages of its own
        toks = prompt + [s[f][0] for s in steps]
        with Driver(tiny, params(own_kernels)) as drv:
            base = 150
            drv.forward(build_batch([Req(prompt, list(range(base, base + 6)), len(prompt))], PAGE))
            rows = []
            for i in range(len(steps)):
                kv = len(prompt) + i + 1
                pages = list(range(base, base + -(-kv // PAGE)))
                rows.append(drv.forward(build_batch([Req([toks[len(prompt) + i]], pages, kv)], PAGE)).logits)
        assert np.array_equal(grouped[f], np.concatenate(rows)), f


def test_group_boundaries_and_masks(tiny: Path, own_kernels: bool) -> None:
    """A request between two forks splits them into two groups; a fork with a custom mask and a
    fork whose first run is longer than the shared part (its own pages follow the prefix's) stay
    exact too."""
    rng = np.random.default_rng(5)
    prompt = rng.integers(3, 500, 40).tolist()  # 5 full pages, no tail
    own = [[5, 6, 7], [60, 61, 62], [70, 71, 72]]  # fork 0's pages follow the prompt's: one longer run
    with Driver(tiny, params(own_kernels)) as drv:
        forks = Forks(drv, prompt, own)
        other = Req(rng.integers(3, 500, 4).tolist(), [200], 4, outputs=[3])
        toks = [[int(t)] for t in rng.integers(3, 500, 3)]
        mask = [0, 10, 5, 26]  # fork 2 hides prompt rows 10..14
        reqs = [forks.req(0, toks[0]), other, forks.req(1, toks[1]), forks.req(2, toks[2], mask=mask)]
        batch = forks.step(reqs)
    with Driver(tiny, params(own_kernels)) as drv:
        forks = Forks(drv, prompt, own)
        alone = [forks.step([r]) for r in reqs]
    assert np.array_equal(batch[0], alone[0][0])
    assert np.array_equal(batch[1], alone[1][0])
    assert np.array_equal(batch[2], alone[2][0])
    assert np.array_equal(batch[3], alone[3][0])


def test_starter_forks_past_the_window_equal_each_alone(starter_gguf: Path, own_kernels: bool) -> None:
    """The starter's sliding-window layers (512 rows) and a KV past the length from which ggml
    splits a lone query's KV over the threads: forks together, each alone, bit for bit."""
    rng = np.random.default_rng(6)
    prompt = rng.integers(10, 5000, 530).tolist()  # 66 full pages + a tail of 2
    own = own_pages(4, 120, 4, interleave=True)
    steps = [[[int(t)] for t in rng.integers(10, 5000, 4)] for _ in range(3)]
    together = fork_runs(starter_gguf, prompt, own, steps, together=True, own_kernels=own_kernels)
    alone = fork_runs(starter_gguf, prompt, own, steps, together=False, own_kernels=own_kernels)
    for f in range(4):
        assert np.array_equal(together[f], alone[f]), f
