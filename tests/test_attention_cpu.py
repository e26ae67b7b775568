"""The driver's own attention kernel (native/ggml_driver/src/attention_cpu.c).

With DriverParams.own_kernels on (the default), on an x86 CPU with AVX-512, attention over the
f16 KV pool runs in the driver's kernel: it reads the pool in place and sums each query's
softmax and V in float32, over the rows its mask shows, in the order of its own KV. Checked here:
- it stays within the rounding of ggml's flash attention (which sums V in fp16) on the first
  layer, for causal, custom-mask, sliding-window and grouped-query models and a bidirectional
  encoder;
- a query's result depends on nothing but its own rows: with every product also batch-invariant
  (the q8_0 kernels), a prompt's logits are the same in one pass, in chunks or token by token, bit
  for bit (forks in a group: test_driver_fork_groups.py runs on both kernels);
- what it does not take (an attention softcap, own_kernels off) runs ggml's kernel unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from driver_helpers import Req, build_batch, cpu_has, tiny_gguf
from tiny_models import write_tiny_encoder

from pie_local.driver import Driver, DriverParams

pytestmark = pytest.mark.real_driver

PAGE = 8
PROMPT = [1, 5, 9, 13, 17, 21, 25, 3, 7, 30, 41, 2, 8, 19, 33, 12, 6, 28, 14, 40, 11, 36, 22, 4, 27, 38, 15, 9, 31, 18,
          24, 10, 35, 16, 29, 20, 37, 23, 26, 39]  # 40 tokens: past the gemma3 window (8), two items of 32 queries
# ggml's flash attention sums V in fp16 (2^-11 relative per rounding, up to 40 roundings here)
# where the kernel sums in float32. Measured, relative to the largest value: the first layer's
# attention output 4.2e-4 (llama f32), 5.8e-4 (qwen3 f16), 7.7e-4 (gemma3 q8_0); the encoder's
# hidden states 5.0e-4. A kernel that drops one row of each query's list is 0.16 .. 1.1 off.
ATTN_TOL = 2e-3


def avx512_cpu() -> bool:
    return cpu_has("avx512f", "avx512bw", "avx512vl", "f16c")


def vnni_cpu() -> bool:
    return avx512_cpu() and cpu_has("avx512_vnni")


def params(own_kernels: bool, **kw) -> DriverParams:
    return DriverParams(n_threads=2, page_size=PAGE, n_pages=64, repack=False, own_kernels=own_kernels, **kw)


def first_layer(path: Path, own_kernels: bool, reqs: list[Req]) -> np.ndarray:
    """Layer 0's attention output for a batch of requests (each on pages of its own)."""
    with Driver(path, params(own_kernels)) as drv:
        with drv.activations(["kqv_out-0"]) as acts:
            drv.forward(build_batch(reqs, PAGE))
        return acts["kqv_out-0"].copy()


def requests() -> list[Req]:
    """A prompt past the sliding window, a short one with a custom mask, and a one-token one."""
    masked = [3, 9, 27, 14, 5, 22]
    return [
        Req(PROMPT, list(range(5)), len(PROMPT), outputs=[len(PROMPT) - 1]),
        # every row's row 3 hidden (BRLE over the 6 rows: 0 hidden, 3 seen, 1 hidden, 2 seen)
        Req(masked, [10], len(masked), masks=[[0, 3, 1, 2]] * len(masked), outputs=[len(masked) - 1]),
        Req([12], [20], 1, outputs=[0]),
    ]


@pytest.mark.parametrize("arch, quant", [("gemma3", "q8_0"), ("llama", "f32"), ("qwen3", "f16")])
def test_first_layer_within_the_rounding_of_ggml(tmp_path_factory, arch: str, quant: str, caplog) -> None:
    caplog.set_level(logging.INFO, logger="pie_local.driver")
    path = tiny_gguf(tmp_path_factory, arch, quant=quant)
    ggml = first_layer(path, False, requests())
    assert "attention: the driver's" not in caplog.text
    own = first_layer(path, True, requests())
    assert ("attention: the driver's AVX-512 kernel" in caplog.text) == avx512_cpu()
    diff = float(np.abs(own - ggml).max())
    assert diff <= ATTN_TOL * float(np.abs(ggml).max()), diff
    if avx512_cpu():
        assert diff > 0  # the kernel ran: its float32 sums differ from ggml's fp16 ones


def one_pass_logits(path: Path, chunks: list[int]) -> np.ndarray:
    """The prompt's logits at every position, fed in chunks of the given sizes."""
    rows = []
    with Driver(path, params(True)) as drv:
        done = 0
        for n in chunks:
            kv = done + n
            pages = list(range(-(-kv // PAGE)))
            out = drv.forward(build_batch([Req(PROMPT[done:kv], pages, kv, outputs=list(range(n)))], PAGE))
            rows.append(np.asarray(out.logits))
            done = kv
    return np.concatenate(rows)


def test_a_prompt_in_one_pass_equals_it_token_by_token(tmp_path_factory) -> None:
    if not vnni_cpu():
        pytest.skip("needs the q8_0 kernels (AVX-512 VNNI) for batch-invariant products")
    path = tiny_gguf(tmp_path_factory, "gemma3", quant="q8_0")
    whole = one_pass_logits(path, [len(PROMPT)])
    assert np.array_equal(whole, one_pass_logits(path, [17, 23]))
    assert np.array_equal(whole, one_pass_logits(path, [1] * len(PROMPT)))


def test_softcap_keeps_ggml_attention(tmp_path_factory) -> None:
    """gemma2 caps its attention logits, which the kernel does not do: ggml's kernel runs, so
    the first layer is the same with own kernels on or off (its f32 products are ggml's too)."""
    path = tiny_gguf(tmp_path_factory, "gemma2")
    assert np.array_equal(first_layer(path, True, requests()), first_layer(path, False, requests()))


def test_bidirectional_encoder_within_the_rounding_of_ggml(tmp_path: Path) -> None:
    path = write_tiny_encoder(tmp_path / "bert.gguf", "bert")
    tokens = [5, 9, 13, 17, 21, 25, 3, 7, 30]

    def hidden(own: bool) -> np.ndarray:
        with Driver(path, params(own)) as drv:
            batch = build_batch([Req(tokens, [0, 1], len(tokens), outputs=list(range(len(tokens))))], PAGE,
                                return_hidden=True, return_logits=False, return_logprobs=False)
            batch.hidden_only = True
            return np.asarray(drv.forward(batch).hidden)

    ggml, own = hidden(False), hidden(True)
    # every row attends to every row; its layers carry the fp16-vs-float32 V sums forward
    assert np.abs(own - ggml).max() <= ATTN_TOL * float(np.abs(ggml).max())
