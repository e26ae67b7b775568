"""Token healing at the prompt boundary (as Guidance does it).

A prompt that ends in the middle of what the model would write as one token ("http:" tokenized
"http" ":" where the model writes "://" as one token) pushes the model off its own tokenization.
Healing takes the prompt's last token back and makes generation start with its bytes instead:
the first token must begin with them (or be a shorter piece of them, then the next continues), so
the model may pick a token that spans the boundary. The healed bytes are not part of the returned
text; the context holds the prompt's text followed by the output either way.
"""

from __future__ import annotations

import bisect
import weakref
from typing import Any

import numpy as np

_INDEXES: weakref.WeakKeyDictionary[Any, VocabIndex] = weakref.WeakKeyDictionary()


class VocabIndex:
    """Every token's bytes, sorted, to find the tokens that begin with given bytes."""

    def __init__(self, tokenizer: Any, n_vocab: int) -> None:
        pairs = [(tokenizer.piece(t, special=False), t) for t in range(n_vocab)]
        pairs = sorted((piece, t) for piece, t in pairs if piece)  # control tokens have no text
        self._pieces = [p for p, _ in pairs]
        self._ids = [t for _, t in pairs]
        self.n_vocab = n_vocab

    def starting_with(self, prefix: bytes) -> list[int]:
        """Tokens whose bytes begin with ``prefix``: a contiguous run of the sorted pieces."""
        lo = bisect.bisect_left(self._pieces, prefix)
        hi = bisect.bisect_left(self._pieces, prefix + b"\xff" * 8, lo)  # no token has 8 bytes 0xff
        return [t for piece, t in zip(self._pieces[lo:hi], self._ids[lo:hi]) if piece.startswith(prefix)]

    def exactly(self, data: bytes) -> list[int]:
        lo = bisect.bisect_left(self._pieces, data)
        hi = bisect.bisect_right(self._pieces, data, lo)
        return self._ids[lo:hi]


def vocab_index(tokenizer: Any, n_vocab: int) -> VocabIndex:
    """The index of a tokenizer's vocabulary, built once (about a second for 262k tokens)."""
    index = _INDEXES.get(tokenizer)
    if index is None or index.n_vocab != n_vocab:
        index = _INDEXES[tokenizer] = VocabIndex(tokenizer, n_vocab)
    return index


class Healing:
    """The bytes generation must still begin with, and the mask that makes it."""

    def __init__(self, prefix: bytes, index: VocabIndex) -> None:
        self.prefix = prefix  # what was taken back from the prompt
        self.remaining = prefix
        self._index = index

    @property
    def active(self) -> bool:
        return bool(self.remaining)

    def mask(self) -> np.ndarray:
        """uint32 bitmask: tokens that begin with the remaining bytes, or are a shorter piece of them."""
        rest = self.remaining
        ids = self._index.starting_with(rest)
        for k in range(1, len(rest)):
            ids += self._index.exactly(rest[:k])
        arr = np.asarray(ids, dtype=np.int64)
        words = np.zeros((self._index.n_vocab + 31) // 32, dtype=np.uint32)
        np.bitwise_or.at(words, arr >> 5, (np.uint32(1) << (arr & 31).astype(np.uint32)))
        return words

    def advance(self, piece: bytes) -> None:
        """A token with these bytes was generated under the mask."""
        self.remaining = b"" if piece.startswith(self.remaining) else self.remaining[len(piece):]


def take_back(ctx: Any) -> Healing | None:
    """Remove the context's last token for healing; None when it cannot be healed (a control
    token such as BOS or a chat turn marker, or nothing would be left to condition on)."""
    tok = ctx.tokenizer
    ids = ctx.token_ids
    if len(ids) < 2:
        return None
    piece = tok.piece(ids[-1], special=False)
    if not piece or tok.is_special(ids[-1]):
        return None
    ctx.sequence.truncate(len(ids) - 1)
    return Healing(piece, vocab_index(tok, ctx.engine_info.n_vocab))
