"""Log-probabilities under a logit mask, in numpy, from the raw logits of a row.

The driver's probes describe what the model predicted: the log-probability of the chosen token
and the top-k over the *raw* logits, whatever the bitmask allowed. Under a constraint a program
also wants the distribution the sampler drew from: the allowed tokens only, renormalised. These
helpers compute that from a row's logits. A bitmask is ``uint32[ceil(n_vocab / 32)]``, bit
``t % 32`` of word ``t // 32`` set when token t is allowed (the driver's format).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mask_to_bool(mask: np.ndarray, n_vocab: int) -> np.ndarray:
    """bool[n_vocab]: which tokens a bitmask allows."""
    bits = np.unpackbits(np.ascontiguousarray(mask, dtype="<u4").view(np.uint8), bitorder="little")
    return bits[:n_vocab].astype(bool)


def count_allowed(mask: np.ndarray) -> int:
    """How many tokens a bitmask allows (1: the token is forced)."""
    return int(np.unpackbits(np.ascontiguousarray(mask, dtype="<u4").view(np.uint8)).sum())


def one_hot_masks(token_ids: Sequence[int], n_vocab: int) -> np.ndarray:
    """uint32[len(token_ids), words]: row i allows only token_ids[i]. A greedy row under such a
    mask "samples" exactly that token, and the driver's raw log-probability probe then gives log p
    of it: teacher forcing without copying a row of logits out."""
    words = (n_vocab + 31) // 32
    out = np.zeros((len(token_ids), words), dtype=np.uint32)
    for i, t in enumerate(token_ids):
        out[i, t >> 5] = np.uint32(1) << np.uint32(t & 31)
    return out


def _log_norm(logits: np.ndarray, allowed: np.ndarray | None) -> float:
    """log of the sum of exp(logits) over the allowed tokens (all when None)."""
    x = logits.astype(np.float64) if allowed is None else logits[allowed].astype(np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("-inf")
    top = float(x.max())
    return top + float(np.log(np.exp(x - top).sum()))


def raw_logprob(logits: np.ndarray, token: int) -> float:
    """log p(token) under the row's full softmax."""
    return float(logits[token]) - _log_norm(logits, None)


def allowed_logprob(logits: np.ndarray, allowed: np.ndarray, token: int) -> float:
    """log p(token) renormalised over the allowed tokens (-inf when the token is not allowed)."""
    if not allowed[token]:
        return float("-inf")
    return float(logits[token]) - _log_norm(logits, allowed)


def allowed_top(logits: np.ndarray, allowed: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most probable allowed tokens with their log-probabilities renormalised over the allowed
    set, most probable first (ties: lower id first)."""
    ids = np.flatnonzero(allowed)
    if k <= 0 or ids.size == 0:
        return []
    values = logits[ids].astype(np.float64)
    if ids.size > k:
        keep = np.argpartition(-values, k - 1)[:k]
        ids, values = ids[keep], values[keep]
    order = np.lexsort((ids, -values))
    log_z = _log_norm(logits, allowed)
    return [(int(ids[i]), float(values[i]) - log_z) for i in order]
