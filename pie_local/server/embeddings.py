"""One /v1/embeddings request on an engine, independent of HTTP: checks, KV admission, the body.

Every input is tokenized and checked before anything runs (an input longer than the model's
context is a 400, never truncated), the pages all inputs may take are admitted as a generation's
are (a 503 when they are not free), then `Engine.embed_many` computes them in the same batches.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from pie_local.runtime import OutOfPagesError
from pie_local.runtime.embedding import input_ids
from pie_local.server.errors import APIError, busy, invalid
from pie_local.server.generation import admit, context_limit, withdraw
from pie_local.server.schema import EmbeddingRequest


class _Promise:
    """What an embedding request holds in the admission books: its whole promise, to the end."""

    promised = 0

    def pages_held(self) -> int:
        return 0


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


async def embed_request(engine: Any, req: EmbeddingRequest, model_name: str) -> dict:
    """The response body of OpenAI's embeddings endpoint for ``req``."""
    info = engine.info
    if req.dimensions is not None and req.dimensions != info.n_embd:
        raise invalid("dimensions", f"this model's embeddings have {info.n_embd} dimensions and cannot be "
                                    "shortened (leave dimensions out)", "unsupported_parameter")
    where = (lambda i: "input") if len(req.inputs) == 1 else (lambda i: f"input[{i}]")
    ids = []
    for i, item in enumerate(req.inputs):
        try:
            ids.append(input_ids(engine.tokenizer, info.n_vocab, item))
        except (TypeError, ValueError) as exc:
            raise invalid(where(i), str(exc)) from None
    limit = context_limit(engine)
    if info.embedding_only:  # an input is computed whole, in one pass
        limit = min(limit, info.max_batch_tokens)
    for i, tokens in enumerate(ids):
        if len(tokens) > limit:
            raise APIError(400, f"{where(i)}: {len(tokens)} tokens; this model's context is {limit} tokens. "
                                "Shorten the input.", param="input", code="context_length_exceeded")
    promise = _Promise()
    admit(engine, promise, sum(-(-len(t) // info.page_size) for t in ids))
    try:
        results = await engine.embed_many(ids)
    except OutOfPagesError as exc:
        raise busy(f"the KV cache is full ({exc}); retry shortly") from None
    except ValueError as exc:  # the model cannot embed (a reranker's pooling)
        raise invalid("model", str(exc), "unsupported_model") from None
    finally:
        withdraw(engine, promise)
    n_tokens = sum(e.n_tokens for e in results)
    return {"object": "list", "model": model_name,
            "data": [{"object": "embedding", "index": i, "embedding": _encode(e.vector, req.encoding_format)}
                     for i, e in enumerate(results)],
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
