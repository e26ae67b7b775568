"""Plain data shared by the real driver and FakeDriver: what goes into and comes out of a forward call.

Arrays are numpy; the shapes mirror ``pie_batch`` in ``native/ggml_driver/include/pie_driver.h``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

import numpy as np


class DriverError(RuntimeError):
    """A driver call failed. ``status`` is the driver's status name, e.g. ``"invalid_argument"``."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}" if message else status)
        self.status = status
        self.message = message


@dataclass
class DriverParams:
    # <= 0: "auto", the cores this process may use (physical cores, CPU affinity, cgroup quota), fewer
    # while other processes keep them busy (Driver.threads says how many now); an explicit count is
    # kept (more than the CPUs online: one per CPU, with a logged warning)
    n_threads: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda:0", "metal"
    page_size: int = 32  # tokens per KV page
    n_pages: int = 512  # KV pages in the pool (n_pages * page_size tokens of KV in all)
    kv_type: str = "f16"  # "f16" or "q8_0"
    max_batch_tokens: int = 512  # tokens per forward pass (the runtime chunks long prefills to this)
    max_batch_kv: int = 0  # KV rows one pass may attend over, summed over requests; 0: page_size * n_pages
    use_mmap: bool = True
    repack: bool = True  # CPU: the matrices ggml's CPU_REPACK kernels take, stored for them (copied, not mapped)
    own_kernels: bool = True  # AVX-512 CPU: the driver's q8_0/q5_0/q4_K/q6_K products and attention instead of ggml's
    # layers on the GPUs / RPC workers, counted from the last (n_layer + 1 adds the output head);
    # -1: as many as fit in their free memory; 0: CPU only
    n_gpu_layers: int = -1
    rpc: tuple[str, ...] = ()  # RPC workers "host:port" whose devices take layers (pie-local worker)
    tensor_split: tuple[float, ...] = ()  # shares of the offloaded layers per offload device; (): by free memory


@dataclass(frozen=True)
class ModelInfo:
    arch: str
    name: str
    backend: str
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    sliding_window: int
    page_size: int
    n_pages: int
    kv_type: str
    max_batch_tokens: int
    max_batch_kv: int
    n_params: int
    weight_bytes: int
    kv_bytes: int
    page_bytes: int
    n_repacked: int = 0  # weights stored for ggml's CPU_REPACK kernels (0: repack off)
    # an embedding model (bert, nomic-bert, gemma-embedding): bidirectional attention, no LM head;
    # each input is computed whole in one pass, for hidden states only
    embedding_only: bool = False


@dataclass(frozen=True)
class DeviceUse:
    """What one device holds of a model (``pie_device_use``): offload devices first, the CPU last."""

    name: str  # "CPU", "CUDA0", "MTL0", "RPC host:port"
    description: str
    is_cpu: bool
    layers: range  # the layers whose weights and KV live here
    input: bool  # the token embeddings
    output: bool  # the output norm and head
    weight_bytes: int
    kv_bytes: int
    compute_bytes: int  # reserved at load (on the CPU: address space, committed as used); 0 in a plan
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class SamplingParams:
    """How one token is drawn: the one sampler type of the runtime and the driver.

    temperature 0 is greedy; filters apply in order top_k, top_p, min_p. ``seed`` makes a sampled
    generation reproducible (step i of a generation draws with ``seed + i``, see ``for_step``);
    None lets the runtime draw a fresh seed per generation (the driver reads None as 0).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        problem = sampler_problem(self) or (self.temperature < 0 and f"temperature must be >= 0 (got {self.temperature})")
        if problem:
            raise ValueError(problem)

    @classmethod
    def greedy(cls) -> SamplingParams:
        return cls()

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0.0

    def with_seed(self, seed: int) -> SamplingParams:
        return replace(self, seed=seed)

    def for_step(self, step: int) -> SamplingParams:
        """The sampler of generation step ``step``: the seed advanced by ``step`` (64-bit)."""
        return replace(self, seed=((self.seed or 0) + step) & 0xFFFFFFFFFFFFFFFF)


def sampler_problem(s: SamplingParams) -> str | None:
    """What is wrong with a sampler, in the C driver's words (batch.c checks the same), or None."""
    if not math.isfinite(s.temperature):  # <= 0 is greedy
        return f"temperature must be finite (got {s.temperature})"
    if s.top_k < 0:
        return f"top_k must be >= 0 (got {s.top_k})"
    if not 0.0 < s.top_p <= 1.0:
        return f"top_p must be in (0, 1] (got {s.top_p})"
    if not 0.0 <= s.min_p <= 1.0:
        return f"min_p must be in [0, 1] (got {s.min_p})"
    return None


@dataclass
class ForwardBatch:
    """One batched forward pass in CSR form (see pie_driver.h for the exact semantics).

    ``mask_indptr``/``mask_runs`` are optional BRLE masks per token; ``logit_masks`` is an optional
    ``uint32[n_outputs, ceil(n_vocab / 32)]`` bitmask (bit set = token allowed).
    """

    tokens: np.ndarray  # int32 [n_tokens]
    positions: np.ndarray  # int32 [n_tokens]
    qo_indptr: np.ndarray  # int32 [n_requests + 1]
    kv_page_indices: np.ndarray  # int32 [kv_page_indptr[-1]]
    kv_page_indptr: np.ndarray  # int32 [n_requests + 1]
    kv_last_page_len: np.ndarray  # int32 [n_requests]
    output_rows: np.ndarray  # int32 [n_outputs]
    samplers: list[SamplingParams] = field(default_factory=list)  # [n_outputs]
    mask_indptr: np.ndarray | None = None  # int32 [n_tokens + 1]
    mask_runs: np.ndarray | None = None  # int32 [mask_indptr[-1]]
    logit_masks: np.ndarray | None = None  # uint32 [n_outputs, words]
    top_k: int = 0  # > 0: return the top-k distribution of each output row
    return_logprobs: bool = True
    return_logits: bool = False
    return_hidden: bool = False
    hidden_only: bool = False  # with return_hidden alone: stop at the hidden states (no LM head, nothing sampled)
    rows_fail_alone: bool = False  # a row that cannot be sampled fails alone (ForwardResult.row_errors), not the call

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_requests(self) -> int:
        return int(self.qo_indptr.shape[0]) - 1

    @property
    def n_outputs(self) -> int:
        return int(self.output_rows.shape[0])


@dataclass
class ForwardResult:
    """What one forward pass returns, one entry per output row.

    A row that could not be sampled (no logit its mask allows is finite: NaN from the model) fails
    the call, unless the batch set ``rows_fail_alone``: then ``row_errors[i]`` is its `DriverError`,
    ``tokens[i]`` is -1 and the other rows are good.
    """

    tokens: np.ndarray  # int32 [n_outputs]
    logprobs: np.ndarray | None = None  # float32 [n_outputs]
    top_ids: np.ndarray | None = None  # int32 [n_outputs, top_k]
    top_probs: np.ndarray | None = None  # float32 [n_outputs, top_k]
    logits: np.ndarray | None = None  # float32 [n_outputs, n_vocab]
    hidden: np.ndarray | None = None  # float32 [n_outputs, n_embd]
    row_errors: list[DriverError | None] = field(default_factory=list)  # [n_outputs], None = sampled


@runtime_checkable
class ModelDriver(Protocol):
    """What the runtime needs of a loaded model: the ctypes `Driver` and `FakeDriver` both are one.
    Every call is synchronous and one at a time; a bad argument raises `DriverError`."""

    @property
    def info(self) -> ModelInfo: ...

    def forward(self, batch: ForwardBatch) -> ForwardResult: ...

    def copy_pages(self, src: Sequence[int], dst: Sequence[int]) -> None: ...

    def read_pages(self, pages: Sequence[int]) -> bytes: ...

    def write_pages(self, pages: Sequence[int], data: bytes) -> None: ...

    def close(self) -> None: ...
