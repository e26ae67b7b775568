"""Building ForwardBatch objects for driver tests without repeating CSR bookkeeping.

A test describes each request as a ``Req`` (its new tokens, its page list, how much KV it has
after the pass, which new tokens to sample) and ``build_batch`` lays the requests out in the
CSR arrays of pie_driver.h. ``SeqState`` follows one sequence across calls (chunked prefill,
decode steps), handing out page ids from a list the test chose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from pie_local.driver.types import ForwardBatch, SamplingParams

GREEDY = SamplingParams()


@dataclass
class Req:
    tokens: Sequence[int]  # the new tokens of this pass
    pages: Sequence[int]  # the request's pages after this pass, in order
    kv_len: int  # KV entries after this pass (the new tokens are the last len(tokens))
    positions: Sequence[int] | None = None  # default: kv_len - n .. kv_len - 1
    masks: Sequence[Sequence[int] | None] | None = None  # BRLE runs per new token (None = no mask)
    outputs: Sequence[int] | None = None  # new-token indices to sample; default: the last one
    samplers: Sequence[SamplingParams] | None = None  # one per output; default greedy

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if self.positions is None:
            self.positions = list(range(self.kv_len - n, self.kv_len))
        if self.outputs is None:
            self.outputs = [n - 1]
        if self.samplers is None:
            self.samplers = [GREEDY] * len(self.outputs)


def build_batch(
    reqs: Sequence[Req],
    page_size: int,
    *,
    return_logits: bool = True,
    return_logprobs: bool = True,
    return_hidden: bool = False,
    top_k: int = 0,
    logit_masks: np.ndarray | None = None,
) -> ForwardBatch:
    tokens: list[int] = []
    positions: list[int] = []
    qo_indptr = [0]
    page_indices: list[int] = []
    page_indptr = [0]
    last_len: list[int] = []
    output_rows: list[int] = []
    samplers: list[SamplingParams] = []
    any_mask = any(r.masks is not None for r in reqs)
    mask_indptr = [0]
    mask_runs: list[int] = []
    for r in reqs:
        base = len(tokens)
        tokens += [int(t) for t in r.tokens]
        positions += [int(p) for p in r.positions]  # type: ignore[union-attr]
        qo_indptr.append(len(tokens))
        page_indices += [int(p) for p in r.pages]
        page_indptr.append(len(page_indices))
        last_len.append(r.kv_len - (len(r.pages) - 1) * page_size)
        output_rows += [base + i for i in r.outputs]  # type: ignore[union-attr]
        samplers += list(r.samplers)  # type: ignore[arg-type]
        for i in range(len(r.tokens)):
            runs = r.masks[i] if r.masks is not None else None
            mask_runs += [int(x) for x in runs] if runs is not None else []
            mask_indptr.append(len(mask_runs))

    def i32(xs: Sequence[int]) -> np.ndarray:
        return np.asarray(xs, dtype=np.int32)

    return ForwardBatch(
        tokens=i32(tokens),
        positions=i32(positions),
        qo_indptr=i32(qo_indptr),
        kv_page_indices=i32(page_indices),
        kv_page_indptr=i32(page_indptr),
        kv_last_page_len=i32(last_len),
        output_rows=i32(output_rows),
        samplers=samplers,
        mask_indptr=i32(mask_indptr) if any_mask else None,
        mask_runs=i32(mask_runs) if any_mask else None,
        logit_masks=logit_masks,
        top_k=top_k,
        return_logprobs=return_logprobs,
        return_logits=return_logits,
        return_hidden=return_hidden,
    )


def pages_needed(kv_len: int, page_size: int) -> int:
    return (kv_len + page_size - 1) // page_size


@dataclass
class SeqState:
    """One sequence across forward calls: its KV length and the page ids it may use, in order."""

    page_pool: Sequence[int]
    page_size: int
    kv_len: int = 0
    next_pos: int = 0
    history: list[int] = field(default_factory=list)

    def req(
        self,
        tokens: Sequence[int],
        *,
        outputs: Sequence[int] | str | None = None,
        samplers: Sequence[SamplingParams] | None = None,
        positions: Sequence[int] | None = None,
    ) -> Req:
        """The Req appending `tokens`; call advance(tokens) once the forward pass succeeded."""
        kv_len = self.kv_len + len(tokens)
        n_pages = pages_needed(kv_len, self.page_size)
        if n_pages > len(self.page_pool):
            raise ValueError(f"sequence needs {n_pages} pages, pool has {len(self.page_pool)}")
        if positions is None:
            positions = list(range(self.next_pos, self.next_pos + len(tokens)))
        outs = list(range(len(tokens))) if outputs == "all" else outputs
        return Req(tokens, list(self.page_pool[:n_pages]), kv_len, positions, None, outs, samplers)  # type: ignore[arg-type]

    def advance(self, tokens: Sequence[int], positions: Sequence[int] | None = None) -> None:
        self.kv_len += len(tokens)
        self.next_pos = (positions[-1] + 1) if positions else self.next_pos + len(tokens)
        self.history += list(tokens)


def allow_mask(n_vocab: int, allowed: Sequence[int] | np.ndarray) -> np.ndarray:
    """uint32[ceil(n_vocab/32)] bitmask: bit (id % 32) of word (id / 32) set = allowed."""
    words = np.zeros((n_vocab + 31) // 32, dtype=np.uint32)
    for t in np.asarray(allowed, dtype=np.int64):
        words[t >> 5] |= np.uint32(1 << (int(t) & 31))
    return words


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


_tiny_files: dict[tuple, Path] = {}


def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, arch: str, quant: str = "f32", **overrides: object) -> Path:
    """Path of a tiny model written once per test session (see tests/tiny_models.py)."""
    from tiny_models import write_tiny_gguf

    key = (arch, quant, tuple(sorted(overrides.items())))
    if key not in _tiny_files:
        name = "_".join([arch, quant] + [f"{k}{v}" for k, v in sorted(overrides.items())])
        out = tmp_path_factory.mktemp("tiny") / f"{name}.gguf"
        _tiny_files[key] = write_tiny_gguf(out, arch, quant=quant, **overrides)
    return _tiny_files[key]


def cpu_has(*flags: str) -> bool:
    """Whether /proc/cpuinfo lists every flag (the driver's own kernels need AVX-512, the q8_0
    ones VNNI too); False where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {flag}" in text for flag in flags)


def repacked_types() -> set[str] | None:
    """The weight types ggml's repack kernels take on this machine (ggml-cpu/repack.cpp,
    ggml_repack_get_optimal_repack_type): x86 with AVX2 q4_0, q4_K, iq4_nl and mxfp4, with
    AVX-512 q2_K too. None elsewhere (not checked by count there)."""
    import ctypes
    import platform

    import llama_cpp

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    cpu = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"))
    if not cpu.ggml_cpu_has_avx2():
        return None
    return {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"} | ({"Q2_K"} if cpu.ggml_cpu_has_avx512() else set())
