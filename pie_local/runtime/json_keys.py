"""No repeated keys in generated JSON objects.

llguidance's JSON grammar writes the keys named in `properties` once each, but keys allowed by
`additionalProperties` or `patternProperties` may repeat: a context-free grammar cannot remember
which ones were used. `KeyTracker` follows the JSON text as it is generated and knows the keys of
every open object; `drop_repeats(mask)` clears the tokens that would complete a key its object
already has, so `{"a":1,"a":2}` cannot be written. (`JsonState` in constraints.py applies it,
and also steers clear of a key that could only end as a repeat: see `KeyTracker.may_run_out`.)

Only tokens holding a double quote can complete a key, and only a few of those are allowed at
any step, so the check costs little: `VocabQuotes` sorts a vocabulary's tokens by their quotes
once, and a step reads only the allowed tokens with enough quotes to reach a key's end.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

QUOTE, BACKSLASH = ord('"'), ord("\\")
OPEN_OBJECT, OPEN_ARRAY, CLOSERS, COMMA = ord("{"), ord("["), (ord("}"), ord("]")), ord(",")
MAX_QUOTES = 5  # the most quotes a step can need (see KeyTracker.quotes_needed)


@dataclass(frozen=True)
class TokenSet:
    """A few tokens of a large vocabulary, kept as the words of a mask they occupy."""

    words: np.ndarray  # indices of the uint32 mask words holding at least one of them
    bits: np.ndarray  # their bits in those words

    @classmethod
    def of(cls, flags: np.ndarray) -> TokenSet:
        padded = np.zeros(32 * ((len(flags) + 31) // 32), dtype=bool)
        padded[: len(flags)] = flags
        bits = np.packbits(padded, bitorder="little").view(np.uint32)
        words = np.flatnonzero(bits)
        return cls(words, bits[words])

    def allowed(self, mask: np.ndarray) -> list[int]:
        """The tokens of this set that `mask` allows."""
        hits = mask[self.words] & self.bits
        out = []
        for i in np.flatnonzero(hits).tolist():
            word, bits = int(self.words[i]), int(hits[i])
            while bits:
                bit = bits & -bits
                bits ^= bit
                out.append(32 * word + bit.bit_length() - 1)
        return out


@dataclass(frozen=True)
class VocabQuotes:
    """What the key checks need to know about a vocabulary's tokens."""

    pieces: list[bytes]  # each token's bytes; b"" for special tokens, which never appear in JSON text
    at_least: list[TokenSet]  # at_least[q]: the tokens with q quotes or more
    # read from inside a string: the plain text before a token's closing quote -> those tokens
    ending_key: dict[bytes, list[int]]
    unusual: TokenSet  # tokens that close a string after an escape, or could write another key after
    commas: TokenSet  # tokens with a comma (they may start a new key)
    commas_after_quote: TokenSet  # tokens with a quote and a comma after it (from inside a string)
    tokenize: Any  # bytes -> token ids


@functools.lru_cache(maxsize=8)
def vocab_quotes(llg_tokenizer: Any) -> VocabQuotes:
    """Built once per llguidance tokenizer (a few tenths of a second for 262k tokens)."""
    n = llg_tokenizer.vocab_size
    pieces = [b"" if llg_tokenizer.is_special_token(t) else llg_tokenizer.decode_bytes([t]) for t in range(n)]
    counts = np.array([p.count(b'"') for p in pieces])
    ending_key: dict[bytes, list[int]] = {}
    unusual = np.zeros(n, dtype=bool)
    for token in np.flatnonzero(counts).tolist():
        piece = pieces[token]
        end = _closing_quote(piece)
        if end < 0:
            continue  # only escaped quotes: it cannot end a string
        if b"\\" in piece[:end] or piece.count(b'"', end + 1) >= 2:
            unusual[token] = True
        else:
            ending_key.setdefault(piece[:end], []).append(token)
    commas = np.array([b"," in p for p in pieces])
    after_quote = np.array([b'"' in p and b"," in p[p.index(b'"'):] for p in pieces])
    return VocabQuotes(pieces, [TokenSet.of(counts >= q) for q in range(MAX_QUOTES + 1)], ending_key,
                       TokenSet.of(unusual), TokenSet.of(commas), TokenSet.of(after_quote),
                       llg_tokenizer.tokenize_bytes)


def _closing_quote(piece: bytes) -> int:
    """Where a string that `piece` continues would end (its first unescaped quote), or -1."""
    escape = False
    for i, byte in enumerate(piece):
        if escape:
            escape = False
        elif byte == BACKSLASH:
            escape = True
        elif byte == QUOTE:
            return i
    return -1


def _key_text(raw: bytes) -> str:
    """A key as JSON means it (escapes resolved), so "\\u000a" and "\\n" are the same key."""
    if b"\\" not in raw:
        return raw.decode("utf-8", errors="surrogateescape")
    try:
        return json.loads(b'"' + raw + b'"')
    except ValueError:
        return raw.decode("utf-8", errors="surrogateescape")


@dataclass
class ObjectKeys:
    """An open object: its keys so far, and what the key checks learned about it."""

    keys: set[str] = field(default_factory=set)
    # Only few tokens could start its keys so far (named keys): they might all get used. None: no key seen
    # yet; False once many could (free keys), for good.
    bounded: bool | None = None
    # key -> the grammar would accept it again (shared by the versions of this object as keys are added)
    repeatable: dict[str, bool] = field(default_factory=dict)

    def copy(self) -> ObjectKeys:
        return ObjectKeys(set(self.keys), self.bounded, dict(self.repeatable))


class KeyTracker:
    """Follows JSON text byte by byte: open containers, strings, and each open object's keys.

    The text is assumed well-formed (the grammar guarantees it); whitespace, numbers, literals
    and colons need no state here.
    """

    def __init__(self) -> None:
        self._frames: list[ObjectKeys | None] = []  # open containers, innermost last (None: an array)
        self._expect_key = False  # the innermost object awaits a key (after "{" or ",")
        self._in_string = False
        self._escape = False  # the previous byte of the string was a backslash
        self._key: bytearray | None = None  # the raw bytes of the key being written, while in a key

    def copy(self) -> KeyTracker:
        """An independent copy (for a forked state)."""
        return self._copy([None if f is None else f.copy() for f in self._frames])

    def _copy(self, frames: list[ObjectKeys | None]) -> KeyTracker:
        other = KeyTracker()
        other._frames = frames
        other._expect_key, other._in_string, other._escape = self._expect_key, self._in_string, self._escape
        other._key = None if self._key is None else bytearray(self._key)
        return other

    def feed(self, data: bytes) -> None:
        """Read generated text."""
        self._scan(data, commit=True)

    def after(self, data: bytes) -> KeyTracker:
        """A copy that has read `data`, to look at (it shares the open objects this one has)."""
        other = self._copy(list(self._frames))
        other._scan(data, commit=True)
        return other

    def repeats_key(self, data: bytes) -> bool:
        """Would reading `data` complete a key that its object already has? Changes nothing."""
        return b'"' in data and self._scan(data, commit=False)

    # ---- where the text is -----------------------------------------------------------------------

    @property
    def in_string(self) -> bool:
        return self._in_string

    @property
    def depth(self) -> int:
        """Open containers."""
        return len(self._frames)

    def object_at(self, depth: int) -> ObjectKeys | None:
        """The open object at `depth` (1: the outermost), None for an array or past the innermost."""
        return self._frames[depth - 1] if 0 < depth <= len(self._frames) else None

    def current_object(self) -> ObjectKeys | None:
        return self.object_at(len(self._frames))

    def choosing_key(self) -> bool:
        """Between an object's "{" or "," and the end of the key that follows."""
        return self._expect_key or self._key is not None

    def key_so_far(self) -> bytes | None:
        """While choosing a key, what of it is written: b"" before its quote, else the quote and
        the raw bytes after it. None when not choosing a key."""
        if self._key is not None:
            return b'"' + bytes(self._key)
        return b"" if self._expect_key else None

    def object_has_keys(self) -> bool:
        """The innermost open container is an object with a key already."""
        obj = self.current_object()
        return obj is not None and bool(obj.keys)

    def may_run_out(self) -> bool:
        """Some open object has keys, might allow only a few, and the grammar would write one of
        them again (or that is not known yet): a new key of it could start but be impossible to
        finish without repeating one."""
        return any(f is not None and f.keys and f.bounded is not False
                   and any(f.repeatable.get(k, True) for k in f.keys) for f in self._frames)

    # ---- masks -----------------------------------------------------------------------------------

    def quotes_needed(self) -> int:
        """The fewest quotes a token needs to complete a repeated key from here. Inside a key: its
        closing quote (1) if its object has keys, else that and a whole second key (3). Before a
        key: a whole key (2), or, in an object with none yet, two (4) unless an outer object has
        keys (the token may close this one and write one of those). Elsewhere: a whole key (2),
        after the end of a string value (3), and two more when no open object has a key."""
        has_keys = self.object_has_keys()
        any_keys = any(f is not None and f.keys for f in self._frames)
        if self._key is not None:
            return 1 if has_keys else 3
        if self._expect_key:
            return 2 if any_keys else 4
        base = 3 if self._in_string else 2
        return base if any_keys else base + 2

    def drop_repeats(self, mask: np.ndarray, vocab: VocabQuotes) -> None:
        """Clear, in place, the bits of `mask` whose token would complete a repeated key."""
        if self._key is not None and not self._escape and b"\\" not in self._key and self.object_has_keys():
            # Inside a plain key, hundreds of allowed tokens may end it: look up the few that end it
            # as a key the object has, and read only the unusual ones (escapes, more keys) in full.
            repeats = [t for t in vocab.unusual.allowed(mask) if self.repeats_key(vocab.pieces[t])]
            for name in self.current_object().keys:
                raw = name.encode("utf-8", errors="surrogateescape")
                if raw.startswith(self._key):
                    repeats += vocab.ending_key.get(raw[len(self._key):], ())
        else:
            # Two keys of one object have a comma between them: unless a key is being chosen
            # already, a token without a comma cannot reach a second one.
            needs_comma = not self.choosing_key()
            candidates = vocab.at_least[self.quotes_needed()].allowed(mask)
            repeats = [t for t in candidates
                       if (not needs_comma or b"," in vocab.pieces[t]) and self.repeats_key(vocab.pieces[t])]
        for token in repeats:
            clear(mask, token)

    def _scan(self, data: bytes, commit: bool) -> bool:
        """Read `data`; True if it completes a key that its object already has. The objects open
        before it are never changed in place (a key it adds to one replaces that object), and
        without `commit` nothing is kept: a check needs no copy."""
        frames = self._frames
        depth = len(frames)  # frames[:depth] are still open
        opened: list[ObjectKeys | None] = []  # what `data` opens, innermost last
        added: dict[int, set[str]] = {}  # keys `data` gives frames[i]
        in_string, escape, expect_key = self._in_string, self._escape, self._expect_key
        key = self._key if commit or self._key is None else bytearray(self._key)
        repeated = False
        for byte in data:
            if in_string:
                if escape or byte != QUOTE:
                    escape = not escape and byte == BACKSLASH
                    if key is not None:
                        key.append(byte)
                    continue
                in_string = False
                if key is not None:
                    name = _key_text(bytes(key))
                    if opened:
                        repeated = repeated or name in opened[-1].keys
                        opened[-1].keys.add(name)
                    else:
                        extra = added.setdefault(depth - 1, set())
                        repeated = repeated or name in frames[depth - 1].keys or name in extra
                        extra.add(name)
                    key = None
            elif byte == QUOTE:
                in_string, escape = True, False
                key = bytearray() if expect_key else None
                expect_key = False
            elif byte == OPEN_OBJECT:
                opened.append(ObjectKeys())
                expect_key = True
            elif byte == OPEN_ARRAY:
                opened.append(None)
                expect_key = False
            elif byte in CLOSERS:
                if opened:
                    opened.pop()
                elif depth:
                    depth -= 1
                expect_key = False
            elif byte == COMMA:
                expect_key = (opened[-1] if opened else frames[depth - 1] if depth else None) is not None
        if commit:
            for i, names in added.items():
                if i < depth:
                    frames[i] = dataclasses.replace(frames[i], keys=frames[i].keys | names)
            frames[depth:] = opened
            self._in_string, self._escape, self._expect_key, self._key = in_string, escape, expect_key, key
        return repeated


def clear(mask: np.ndarray, token: int) -> None:
    """Disallow one token in a uint32 bitmask."""
    mask[token >> 5] &= np.uint32(~(1 << (token & 31)) & 0xFFFFFFFF)
