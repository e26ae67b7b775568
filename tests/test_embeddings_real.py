"""Embeddings of the real driver against llama.cpp's own pooling (llama_get_embeddings_seq with the
context's pooling type set, as llama_cpp.Llama(embedding=True).embed reads them) on tiny models
whose files name their pooling type, normalised the way llama.cpp's embedding example does (L2).

Tolerance: see TOL below (measured max |diff| and why it is not zero).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import gguf
import numpy as np
import pytest
from driver_helpers import Req, build_batch, tiny_gguf
from llama_ref import LlamaRef, compare_embeddings
from tiny_models import N_VOCAB, write_tiny_gguf

from pie_local.driver import Driver, DriverError, DriverParams
from pie_local.driver.fake import FakeChatTemplate
from pie_local.models.tokenizer import Tokenizer
from pie_local.runtime import Engine, EngineConfig

pytestmark = [pytest.mark.real_driver, pytest.mark.llama_cpp]

POOLING = {"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS, "last": gguf.PoolingType.LAST}
TEXTS = ["the world is good", "people work here and there", "the", "all the men of the state made it good"]
# Measured (f32 tiny models, 2 threads, CPU; `pytest -s tests/test_embeddings_real.py` prints it):
# max |diff| of the unit vectors 4.9e-8 (qwen3, mean), 1.2e-8..1.7e-8 for cls, 2.0e-8..3.5e-8 for
# last. The hidden states are llama.cpp's bit for bit; what remains is float32 rounding: we return
# the unit vector in float32 (compared with llama.cpp's normalised in float64), and mean pooling
# sums in float64 where llama.cpp sums in float32. A wrong row, pooling or norm is >= 1e-2 off.
TOL = 1e-7


def model(tmp_path: Path, arch: str, pooling: str) -> Path:
    return write_tiny_gguf(tmp_path / f"{arch}-{pooling}.gguf", arch,
                           metadata_hook=lambda w: w.add_pooling_type(POOLING[pooling]))


def llama_cpp_embeddings(path: Path, pooling: str, texts: list[str]) -> tuple[np.ndarray, list[int]]:
    with LlamaRef(path, n_ctx=256, embeddings=True, pooling=int(POOLING[pooling])) as ref:
        return ref.unit_embeddings(texts)  # BOS as the model asks, special tokens parsed as text


def engine_for(path: Path) -> Engine:
    # ggml's kernels, as llama.cpp runs them: the comparison is exact
    params = DriverParams(n_threads=2, page_size=8, n_pages=64, device="cpu", own_kernels=False)
    driver = Driver(path, params)
    return Engine(driver=driver, config=EngineConfig(driver=params), tokenizer=Tokenizer.from_gguf(path),
                  chat_template=FakeChatTemplate())


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "gemma3"])
@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_embeddings_equal_llama_cpps(tmp_path: Path, record_property, arch: str, pooling: str) -> None:
    path = model(tmp_path, arch, pooling)
    want, counts = llama_cpp_embeddings(path, pooling, TEXTS)

    async def run():
        engine = engine_for(path)
        try:
            async with engine:
                got = await engine.embed_many(TEXTS)  # the file's pooling
                assert engine.pool.n_used == 0
                return got
        finally:
            engine.driver.close()

    got = asyncio.run(run())
    vectors = compare_embeddings(record_property, f"embed.{arch}.{pooling}", got, want, counts, pooling, TOL)
    if pooling == "cls":  # causal attention: the first token (BOS) sees nothing else, in llama.cpp too
        assert np.array_equal(vectors[0], vectors[1])
    else:  # distinct texts give distinct vectors (the comparison is not between constants)
        assert np.abs(vectors[0] - vectors[1]).max() > 0.05


def test_hidden_only_passes_skip_the_head_and_give_the_same_states(tmp_path_factory) -> None:
    """PIE_RETURN_HIDDEN_ONLY: the same hidden states as a pass that runs the LM head and samples,
    no logits, nothing sampled; combined with any other output it is refused, and the driver goes on."""
    tokens = [1] + np.random.default_rng(8).integers(3, N_VOCAB, 20).tolist()
    rows = list(range(len(tokens)))
    with Driver(tiny_gguf(tmp_path_factory, "gemma2"), DriverParams(n_threads=2, page_size=8, n_pages=8)) as drv:
        full = drv.forward(build_batch([Req(tokens, [0, 1, 2], len(tokens), outputs=rows)], 8, return_hidden=True))
        only = build_batch([Req(tokens, [3, 4, 5], len(tokens), outputs=rows)], 8, return_hidden=True,
                           return_logits=False, return_logprobs=False)
        only.hidden_only = True
        res = drv.forward(only)
        assert np.array_equal(res.hidden, full.hidden) and res.logits is None and res.logprobs is None
        bad = build_batch([Req(tokens, [6, 7, 0], len(tokens), outputs=rows)], 8, return_hidden=True)
        bad.hidden_only = True  # with logits and log-probabilities asked for too
        with pytest.raises(DriverError, match="PIE_RETURN_HIDDEN_ONLY goes with PIE_RETURN_HIDDEN alone") as err:
            drv.forward(bad)
        assert err.value.status == "invalid_argument"
        again = drv.forward(build_batch([Req(tokens, [0, 1, 2], len(tokens), outputs=rows)], 8, return_hidden=True))
        assert np.array_equal(again.logits, full.logits)
