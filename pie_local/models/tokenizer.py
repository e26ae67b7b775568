"""Tokenizer read from a GGUF file's vocabulary, through llama.cpp's `vocab_only` model.

llama.cpp implements every GGUF vocab type (SentencePiece, BPE, WordPiece, UGM, RWKV), so the
tokenizer is the one the model was trained with, byte for byte. Only the vocabulary is loaded
(no weights), which takes about a second for a 262k-entry vocab.

    tok = Tokenizer.from_gguf("model.gguf")
    ids = tok.encode("Hello")          # -> [9259]
    tok.decode(ids)                    # -> "Hello"
    dec = tok.stream_decoder()         # streaming: complete UTF-8 text as tokens arrive
"""

from __future__ import annotations

import codecs
import ctypes
import os
import threading
from collections.abc import Iterable

from pie_local.llama_logs import route_llama_logs


class TokenizerError(ValueError):
    """The GGUF vocabulary could not be loaded, or a token id is out of range."""


class StreamDecoder:
    """Turns generated tokens into text as they arrive, never splitting a UTF-8 character.

    A multi-byte character can be split across tokens (byte-fallback tokens such as <0xE2>);
    the bytes are held back until the character is complete. Invalid sequences become U+FFFD.
    The pieces are concatenated as generated: a continuation keeps its leading space.
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became complete (often "", never a partial char)."""
        return self._utf8.decode(self._tokenizer.piece(token_id, special=self._special))

    def push_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """End of stream: whatever bytes are still pending (an incomplete character -> U+FFFD)."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """Encode/decode with a GGUF model's own vocabulary (llama.cpp `vocab_only` model)."""

    def __init__(self, model_ptr, path: str) -> None:  # use Tokenizer.from_gguf
        import llama_cpp

        self._llama = llama_cpp
        self._model = model_ptr
        self._vocab = llama_cpp.llama_model_get_vocab(model_ptr)
        self.path = path
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self._vocab)
        bos = llama_cpp.llama_vocab_bos(self._vocab)
        self.bos_id: int | None = bos if bos >= 0 else None
        eos = llama_cpp.llama_vocab_eos(self._vocab)
        eot = llama_cpp.llama_vocab_eot(self._vocab)
        # Every end-of-generation token (eos, eot, <|im_end|>, <end_of_turn>, ...), as llama.cpp marks them.
        self.eos_ids: frozenset[int] = frozenset(
            t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t)
        )
        self.eos_id: int | None = eos if eos >= 0 else (eot if eot >= 0 else min(self.eos_ids, default=None))
        self.add_bos: bool = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.add_eos: bool = bool(llama_cpp.llama_vocab_get_add_eos(self._vocab))
        self._llg = None
        self._llg_lock = threading.Lock()
        self._kept: frozenset[int] = frozenset()  # control tokens generated text shows (keep_in_text)

    # ---- construction / lifetime --------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, check: bool = True) -> Tokenizer:
        """Load only the vocabulary of a GGUF file. Raises TokenizerError with the path on failure.

        check: first refuse a vocabulary llama.cpp would crash on (models/gguf_check.py; False only
        for the check's own test load, in a child process).
        """
        import llama_cpp

        route_llama_logs()
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise TokenizerError(f"GGUF file not found: {path}")
        if check:
            from pie_local.models.errors import GGUFError
            from pie_local.models.gguf_check import check_vocab

            try:
                check_vocab(path)
            except GGUFError as exc:
                raise TokenizerError(f"cannot read the vocabulary: {exc}") from exc
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        params.use_extra_bufts = False  # no weights are loaded, but never touch the AMX buffer type
        model = llama_cpp.llama_model_load_from_file(path.encode(), params)
        if not model:
            raise TokenizerError(f"cannot read the vocabulary of {path} (not a GGUF model file, or an "
                                 "unsupported tokenizer); see the 'pie_local.llama_cpp' log for details")
        return cls(model, path)

    def close(self) -> None:
        """Free the llama.cpp vocab model. The llguidance tokenizer calls into it: close last."""
        if self._model:
            self._llama.llama_model_free(self._model)
            self._model = None
            self._vocab = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: llama_cpp may already be gone
            pass

    def _check(self) -> None:
        if self._vocab is None:
            raise TokenizerError("tokenizer is closed")

    # ---- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Text -> token ids.

        add_special: prepend BOS (and append EOS) if the model asks for it (see `add_bos`).
        parse_special: "<start_of_turn>" in the text becomes the control token, not literal text
        (what chat-template output needs; pass False for untrusted user text).
        """
        self._check()
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            out = (self._llama.llama_token * capacity)()
            n = self._llama.llama_tokenize(self._vocab, data, len(data), out, capacity, add_special, parse_special)
            if n >= 0:
                return list(out[:n])
            if -n <= capacity:  # should not happen: a negative count always asks for more room
                raise TokenizerError(f"llama_tokenize failed ({n})")
            capacity = -n

    def decode(self, ids: Iterable[int], special: bool = True) -> str:
        """Token ids -> text, the inverse of encode (control tokens shown when `special`; without
        it, those of `keep_in_text` still are)."""
        self._check()
        ids = [self._valid(t) for t in ids]
        if not ids:
            return ""
        if not special and self._kept.intersection(ids):
            return b"".join(self.piece(t, special=False) for t in ids).decode("utf-8", errors="replace")
        arr = (self._llama.llama_token * len(ids))(*ids)
        capacity = 8 * len(ids) + 32
        while True:
            buf = ctypes.create_string_buffer(capacity)
            n = self._llama.llama_detokenize(self._vocab, arr, len(ids), buf, capacity, False, special)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            capacity = -n

    def piece(self, token_id: int, special: bool = True) -> bytes:
        """The bytes one token stands for (byte-fallback tokens give raw, maybe partial, UTF-8).
        special=False is the text of a generation: control tokens give b"", except those of
        `keep_in_text`."""
        self._check()
        token_id = self._valid(token_id)
        special = special or token_id in self._kept
        capacity = 64
        while True:
            buf = ctypes.create_string_buffer(capacity)
            n = self._llama.llama_token_to_piece(self._vocab, token_id, buf, capacity, 0, special)
            if n >= 0:
                return buf.raw[:n]
            capacity = -n

    def is_special(self, token_id: int) -> bool:
        """Control tokens (<bos>, <end_of_turn>, <|im_start|>...) that text never contains."""
        self._check()
        return bool(self._llama.llama_vocab_is_control(self._vocab, self._valid(token_id)))

    def special_token(self, text: str) -> int | None:
        """The id of `text` when the vocab has it as one special token, which generated text and
        grammars cannot spell with ordinary tokens (Mistral's [TOOL_CALLS], Phi's <|tool_call|>)."""
        ids = self.encode(text, parse_special=True)
        if len(ids) != 1 or self.piece(ids[0], special=True) != text.encode():
            return None
        return ids[0] if self._is_grammar_special(ids[0]) else None

    def keep_in_text(self, markers: Iterable[str]) -> None:
        """Show these special tokens in generated text (a tool-call format's markers, as llama.cpp's
        preserved tokens): without them a call could not be told from prose."""
        ids = {t for m in markers if (t := self.special_token(m)) is not None}
        self._kept = frozenset(self._kept | ids)

    def _is_grammar_special(self, token_id: int, piece: bytes | None = None) -> bool:
        """Control tokens, and user-defined ones that look like tags (<tool_call>): llguidance
        matches them only by name or id, never as text. `piece`: the token's, if known."""
        attr = self._llama.llama_vocab_get_attr(self._vocab, token_id)
        if attr & self._llama.LLAMA_TOKEN_ATTR_CONTROL:
            return True
        if not attr & self._llama.LLAMA_TOKEN_ATTR_USER_DEFINED:
            return False
        piece = self.piece(token_id, special=True) if piece is None else piece
        return piece.startswith(b"<") and piece.endswith(b">")

    def stream_decoder(self, special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, special=special)

    def _valid(self, token_id: int) -> int:
        token_id = int(token_id)
        if not 0 <= token_id < self.n_vocab:
            raise TokenizerError(f"token id {token_id} out of range [0, {self.n_vocab})")
        return token_id

    # ---- GGUF metadata --------------------------------------------------------------------------

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as a string (arrays are not available), or None when absent."""
        self._check()
        capacity = 256
        while True:
            buf = ctypes.create_string_buffer(capacity)
            n = self._llama.llama_model_meta_val_str(self._model, key.encode(), buf, capacity)
            if n < 0:
                return None
            if n < capacity:
                return buf.raw[:n].decode("utf-8", errors="replace")
            capacity = n + 1

    @property
    def chat_template(self) -> str | None:
        """The GGUF's default `tokenizer.chat_template`, if the file has one."""
        self._check()
        raw = self._llama.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    @property
    def architecture(self) -> str | None:
        return self.metadata("general.architecture")

    def token_text(self, token_id: int | None) -> str:
        """A token as text for chat templates' bos_token/eos_token ("" for None)."""
        return "" if token_id is None else self.piece(token_id, special=True).decode("utf-8", errors="replace")

    # ---- llguidance -----------------------------------------------------------------------------

    def llguidance_tokenizer(self):
        """llguidance's view of this vocab, built once (about 3 s for 262k tokens) and cached.

        It calls llama.cpp's tokenizer through this object's vocab, so keep this Tokenizer alive
        (constraint states hold a reference to it).
        """
        self._check()
        with self._llg_lock:
            if self._llg is None:
                self._llg = self._build_llguidance_tokenizer()
            return self._llg

    def _build_llguidance_tokenizer(self):
        import llguidance

        llama = self._llama
        tokens: list[bytes] = []
        for t in range(self.n_vocab):
            piece = self.piece(t, special=True)
            # llguidance marks special tokens with a 0xFF prefix so grammar text never matches them.
            tokens.append(b"\xff" + piece if self._is_grammar_special(t, piece) else piece)
        tokenize = ctypes.cast(llama.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
        try:
            return llguidance.LLTokenizer.from_llamacpp(tokens=tokens, vocab_ptr=self._vocab, tokenize_fptr=tokenize,
                                                        eos_token=sorted(self.eos_ids), slices=None)
        except ValueError as exc:  # e.g. control tokens that tokenize as plain text: a damaged vocabulary
            raise TokenizerError(f"{self.path}: the vocabulary cannot drive constrained generation: {exc}") from exc

    def __repr__(self) -> str:
        return f"Tokenizer({os.path.basename(self.path)!r}, n_vocab={self.n_vocab})"
