"""Embeddings: one vector per input, pooled from the model's final hidden states.

    async with Engine("path/to/an-embedding-model.gguf") as engine:   # or any model name
        e = await engine.embed("The capital of France is Paris")
        print(len(e.vector), e.n_tokens)
        vectors = [x.vector for x in await engine.embed_many(["one", "two"], pooling="last")]

Two kinds of model embed:
  decoders (any supported LLM, Qwen3-Embedding): causal attention, as for generation; the hidden
    states are taken after the output norm (llama.cpp's ``t_embd``);
  embedding models (``bert``: bge, all-MiniLM, mxbai-embed; ``nomic-bert``: nomic-embed-text;
    ``gemma-embedding``: EmbeddingGemma): bidirectional attention and no LM head
    (``ModelInfo.embedding_only``); each input is computed whole in one pass (at most
    max_batch_tokens tokens), and the hidden states are what llama.cpp pools: the last layer's
    output for the BERT families, after the output norm and the file's dense projections for
    EmbeddingGemma. Such a model cannot generate: that is refused with a clear error.
Pooling is done here, as llama.cpp does it, over the hidden states the driver returns:
  mean: the average over every token of the input;
  cls:  the first token's state;
  last: the last token's state (Qwen3-Embedding and other causal embedders).
The default is what the file asks for (``<arch>.pooling_type``), else mean. Then, unless
``normalize=False``, the vector is scaled to unit Euclidean length (what OpenAI's embeddings are,
and llama.cpp's ``embd_normalize`` default).

Each input runs in a context of its own: many inputs are computed in the same batches, only the
rows the pooling reads come back from the driver, and a batch of embeddings alone skips the LM head
(the driver's PIE_RETURN_HIDDEN_ONLY).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from pie_local.driver.types import SamplingParams

if TYPE_CHECKING:
    from pie_local.runtime.context import Context

__all__ = ["POOLINGS", "Embedding", "embed", "model_pooling"]

POOLINGS = ("mean", "cls", "last")
# llama.cpp's enum llama_pooling_type, as <arch>.pooling_type stores it
_GGUF_POOLING = {0: None, 1: "mean", 2: "cls", 3: "last", 4: "rank"}


@dataclass
class Embedding:
    """One input's embedding."""

    vector: np.ndarray  # float32 [n_embd]
    n_tokens: int  # tokens the input took (what the model read)
    pooling: str  # "mean", "cls" or "last"
    normalized: bool  # scaled to unit Euclidean length

    def tolist(self) -> list[float]:
        return [float(x) for x in self.vector]


def model_pooling(tokenizer: object, arch: str) -> str | None:
    """The pooling the GGUF asks for (``<arch>.pooling_type``), or None when it names none.
    A reranker's "rank" pooling is refused: it scores pairs, it does not embed."""
    raw = tokenizer.metadata(f"{arch}.pooling_type")
    if raw is None:
        return None
    try:
        kind = _GGUF_POOLING.get(int(raw), "unknown")
    except ValueError:
        kind = "unknown"
    if kind not in (None, *POOLINGS):
        raise ValueError(f"this model's pooling type is {kind!r} ({arch}.pooling_type = {raw}); "
                         f"embeddings support {', '.join(POOLINGS)}")
    return kind


def input_ids(tokenizer: object, n_vocab: int, item: str | Sequence[int]) -> list[int]:
    """Text is tokenized as llama.cpp's embedding path does (BOS/EOS as the model asks, special
    tokens in the text stay text); token ids are taken as they are, after a range check."""
    if isinstance(item, str):
        ids = tokenizer.encode(item, add_special=True, parse_special=False)
    elif isinstance(item, (list, tuple, np.ndarray)) and all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in item):
        ids = [int(t) for t in item]
        for t in ids:
            if not 0 <= t < n_vocab:
                raise ValueError(f"token id {t} out of range [0, {n_vocab})")
    else:
        raise TypeError(f"an input to embed is a string or a list of token ids, got {type(item).__name__} "
                        "(embed_many() takes a list of inputs)")
    if not ids:
        raise ValueError("the input to embed is empty (it has no tokens)")
    return ids


def pool(hidden: np.ndarray, pooling: str) -> np.ndarray:
    """hidden: float32 [rows, n_embd], the rows pooling_rows() chose -> float32 [n_embd]."""
    if pooling == "mean":
        return hidden.mean(axis=0, dtype=np.float64).astype(np.float32)
    return np.asarray(hidden[0], dtype=np.float32)


def pooling_rows(n_tokens: int, pooling: str) -> list[int]:
    """The token rows whose hidden states `pooling` reads."""
    if pooling == "mean":
        return list(range(n_tokens))
    return [0] if pooling == "cls" else [n_tokens - 1]


def unit(vector: np.ndarray) -> np.ndarray:
    """Scaled to Euclidean length 1 (a zero vector stays zero), summed in float64."""
    norm = float(np.sqrt(np.sum(vector.astype(np.float64) ** 2)))
    return (vector / norm).astype(np.float32) if norm > 0 else vector


async def embed_one(ctx: Context, ids: list[int], pooling: str, normalize: bool) -> Embedding:
    """Computes ``ids`` in the empty context ``ctx`` and pools the rows ``pooling`` reads."""
    rows = pooling_rows(len(ids), pooling)
    out = await ctx.sequence.submit(ids, None, None, rows, [SamplingParams()] * len(rows), hidden_only=True)
    if out.hidden is None or out.hidden.shape[0] != len(rows):  # the prefix cache covered the rows
        raise RuntimeError("the hidden states of the input were not computed")
    vector = pool(out.hidden, pooling)
    return Embedding(unit(vector) if normalize else vector, len(ids), pooling, normalize)


async def embed(new_context: Callable[[], Context], tokenizer: object, n_vocab: int, arch: str,
                inputs: Sequence[str | Sequence[int]], pooling: str | None, normalize: bool) -> list[Embedding]:
    """Every input in a context of its own, computed together; contexts are released at the end.
    Bad inputs are refused before anything runs."""
    if pooling is None:
        pooling = model_pooling(tokenizer, arch) or "mean"
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if isinstance(inputs, (str, bytes)):
        raise TypeError("embed_many() takes a list of inputs; embed() takes one text")
    if not inputs:
        raise ValueError("nothing to embed: the list of inputs is empty")
    ids = [input_ids(tokenizer, n_vocab, item) for item in inputs]
    contexts: list[Context] = []
    try:
        for _ in ids:
            contexts.append(new_context())
        for ctx, item in zip(contexts, ids):
            ctx.sequence.check_positions(len(item) - 1)  # too long for the model: refused, never cut
            ctx.sequence.check_one_pass(len(item))
        results = await asyncio.gather(*(embed_one(c, i, pooling, normalize) for c, i in zip(contexts, ids)),
                                       return_exceptions=True)
    finally:
        for ctx in contexts:
            ctx.release()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)
