"""A deterministic stand-in for the native driver and the GGUF tokenizer, for tests.

`FakeDriver` has exactly the interface of `pie_local.driver.Driver` (forward, copy_pages,
read_pages, write_pages, info, close). Its "KV cache" stores, per page slot, the token id and
position written there; the logits of an output row are a pseudo-random function of the KV the
row can see (its request's page table, causality and its BRLE mask), so prefix sharing, forks,
masks and snapshots are observable without a real model. It validates batches like the real
driver, counts the tokens it processes and can be told to sleep in `forward` (overlap tests).

`FakeTokenizer` is a byte-level vocabulary (one token per byte) plus a few control tokens, and
`FakeChatTemplate` renders a Gemma-style chat format with it.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from pie_local.driver import brle
from pie_local.driver.types import (DriverError, DriverParams, ForwardBatch, ForwardResult, ModelInfo, SamplingParams,
                                    sampler_problem)

# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>")
N_SPECIAL = len(SPECIAL_TOKENS)
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIAL_TOKENS))


class FakeTokenizer:
    """Byte-level tokenizer: ids 0..4 are control tokens, id 5 + b is byte b."""

    def __init__(self) -> None:
        self.n_vocab = N_SPECIAL + 256
        self.bos_id = SPECIAL_TOKENS.index("<bos>")
        self.eos_id = SPECIAL_TOKENS.index("<eos>")
        self.eos_ids = frozenset({self.eos_id, SPECIAL_TOKENS.index("<end_of_turn>")})
        self.add_bos = True
        self._llg = None
        self.meta: dict[str, str] = {}  # GGUF metadata a test gives it ("fake.pooling_type": "3", ...)

    def metadata(self, key: str) -> str | None:
        return self.meta.get(key)

    def token_id(self, special: str) -> int:
        return SPECIAL_TOKENS.index(special)

    def encode(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        ids = [self.bos_id] if add_special and self.add_bos else []
        pos = 0
        if parse_special:
            for match in _SPECIAL_RE.finditer(text):
                ids += [N_SPECIAL + b for b in text[pos : match.start()].encode()]
                ids.append(SPECIAL_TOKENS.index(match.group()))
                pos = match.end()
        ids += [N_SPECIAL + b for b in text[pos:].encode()]
        return ids

    def piece(self, token_id: int, special: bool = True) -> bytes:
        token_id = int(token_id)
        if not 0 <= token_id < self.n_vocab:
            raise ValueError(f"token id {token_id} out of range [0, {self.n_vocab})")
        if token_id < N_SPECIAL:
            return SPECIAL_TOKENS[token_id].encode() if special else b""
        return bytes([token_id - N_SPECIAL])

    def decode(self, ids: Iterable[int], special: bool = True) -> str:
        return b"".join(self.piece(t, special) for t in ids).decode("utf-8", errors="replace")

    def is_special(self, token_id: int) -> bool:
        return 0 <= int(token_id) < N_SPECIAL

    def stream_decoder(self, special: bool = False) -> "FakeStreamDecoder":
        return FakeStreamDecoder(self, special)

    def llguidance_tokenizer(self):
        """llguidance's view of this vocab (control tokens carry llguidance's 0xFF marker)."""
        if self._llg is None:
            import llguidance

            tok = self

            class _Vocab:
                eos_token_id = self.eos_id
                bos_token_id = self.bos_id
                tokens = [b"\xff" + s.encode() for s in SPECIAL_TOKENS] + [bytes([b]) for b in range(256)]
                special_token_ids = list(range(N_SPECIAL))

                def __call__(self, data: bytes) -> list[int]:
                    return tok.encode(data.decode("utf-8", errors="replace"), parse_special=False)

            self._llg = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab()))
        return self._llg


class FakeStreamDecoder:
    """Incremental UTF-8 decoding of token pieces (same contract as the real StreamDecoder)."""

    def __init__(self, tokenizer: FakeTokenizer, special: bool) -> None:
        self._tokenizer = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.piece(token_id, self._special))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class FakeChatTemplate:
    """Gemma-style turns: ``<start_of_turn>{role}\\n{content}<end_of_turn>\\n``; the model speaks as "model"."""

    stop_strings: list[str] = ["<end_of_turn>"]

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        out = []
        if tools:
            out.append("<start_of_turn>system\nTools: " + json.dumps(tools, sort_keys=True) + "<end_of_turn>\n")
        for m in messages:
            role = "model" if m["role"] == "assistant" else m["role"]
            out.append(f"<start_of_turn>{role}\n{m.get('content') or ''}<end_of_turn>\n")
        if add_generation_prompt:
            out.append("<start_of_turn>model\n")
        return "".join(out)

    def parse_tool_calls(self, text: str) -> list:
        from pie_local.models.chat_template import parse_tool_calls

        return parse_tool_calls(text)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

_SLOT = struct.Struct("<iii")  # written flag, token, position — one KV slot in read_pages' layout

NextTokenRule = Callable[[list[int]], "int | None"]


@dataclass
class FakeDriverStats:
    calls: int = 0
    tokens: int = 0  # tokens forwarded (prefill + decode), summed over calls
    batches: list[dict] = field(default_factory=list)  # per call: n_tokens, n_requests, n_outputs, head (LM head run)
    copies: int = 0
    pages_read: int = 0
    pages_written: int = 0


class FakeDriver:
    """Same interface as `pie_local.driver.Driver`, over a toy model (see the module docstring).

    ``next_token(visible_tokens) -> int | None`` optionally forces the favourite token of a row
    (its logit is raised far above the others), so tests can script what the model "says".
    ``delay`` seconds are slept in every forward call, outside any lock the event loop needs.
    ``nan_tokens``: token ids that poison a row, as a NaN in a real model would: a sampled row
    that sees one of them has NaN logits and fails alone (``ForwardResult.row_errors``).
    """

    def __init__(self, params: DriverParams | None = None, *, n_vocab: int | None = None,
                 next_token: NextTokenRule | None = None, delay: float = 0.0, name: str = "fake",
                 n_ctx_train: int = 4096, nan_tokens: Iterable[int] = ()) -> None:
        self.params = params or DriverParams(page_size=4, n_pages=64, max_batch_tokens=64)
        p = self.params
        if p.page_size < 1 or p.n_pages < 1 or p.max_batch_tokens < 1:
            raise DriverError("invalid_argument", "page_size, n_pages and max_batch_tokens must be >= 1")
        self.tokenizer = FakeTokenizer()
        vocab = n_vocab or self.tokenizer.n_vocab
        self._info = ModelInfo(
            arch="fake", name=name, backend="CPU", n_vocab=vocab, n_ctx_train=n_ctx_train, n_embd=8, n_layer=1,
            n_head=1, n_head_kv=1, head_dim=8, sliding_window=0, page_size=p.page_size, n_pages=p.n_pages,
            kv_type=p.kv_type, max_batch_tokens=p.max_batch_tokens,
            max_batch_kv=p.max_batch_kv if p.max_batch_kv > 0 else p.n_pages * p.page_size, n_params=0, weight_bytes=0,
            kv_bytes=p.n_pages * p.page_size * _SLOT.size, page_bytes=p.page_size * _SLOT.size,
        )
        # [n_pages, page_size] token and position per slot; -1 = never written
        self._kv_tok = np.full((p.n_pages, p.page_size), -1, dtype=np.int64)
        self._kv_pos = np.full((p.n_pages, p.page_size), -1, dtype=np.int64)
        self.next_token = next_token
        self.nan_tokens = frozenset(int(t) for t in nan_tokens)
        self.delay = delay
        self.stats = FakeDriverStats()
        self._busy = threading.Lock()  # the real driver is one call at a time; detect overlap
        self.closed = False

    @property
    def info(self) -> ModelInfo:
        return self._info

    # ---- the toy model -------------------------------------------------------------------------

    def logits_for(self, visible: list[tuple[int, int]]) -> np.ndarray:
        """float32 [n_vocab]: a fixed pseudo-random function of the visible (token, position) KV;
        all NaN when a token of ``nan_tokens`` is visible."""
        if any(t in self.nan_tokens for t, _ in visible):
            return np.full(self._info.n_vocab, np.nan, dtype=np.float32)
        digest = hashlib.blake2b(np.asarray(visible, dtype=np.int64).tobytes(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        logits = rng.normal(0.0, 2.0, self._info.n_vocab).astype(np.float32)
        if self.next_token is not None:
            favourite = self.next_token([t for t, _ in visible])
            if favourite is not None:
                logits[int(favourite)] = logits.max() + 20.0
        return logits

    # ---- forward ---------------------------------------------------------------------------------

    def forward(self, batch: ForwardBatch) -> ForwardResult:
        self._check_open()
        if not self._busy.acquire(blocking=False):
            raise DriverError("invalid_argument", "forward called while another driver call is running")
        try:
            if self.delay:
                time.sleep(self.delay)
            kv_lens = self._validate(batch)
            return self._run(batch, kv_lens)
        finally:
            self._busy.release()

    def _validate(self, b: ForwardBatch) -> list[int]:
        """The C driver's checks (batch.c), in its order and with its messages. Returns KV lengths."""
        info = self._info
        ps, n_pages, vocab = info.page_size, info.n_pages, info.n_vocab

        def bad(msg: str) -> DriverError:
            return DriverError("invalid_argument", msg)

        if b.n_tokens < 1:
            raise bad("batch has no tokens")
        if b.n_tokens > info.max_batch_tokens:
            raise bad(f"batch has {b.n_tokens} tokens; max_batch_tokens is {info.max_batch_tokens}")
        if b.positions.shape[0] != b.n_tokens:
            raise bad(f"{b.positions.shape[0]} positions for {b.n_tokens} tokens")
        for t in range(b.n_tokens):
            if not 0 <= int(b.tokens[t]) < vocab:
                raise bad(f"token {t}: id {int(b.tokens[t])} out of range (n_vocab={vocab})")
            if int(b.positions[t]) < 0:
                raise bad(f"token {t}: negative position {int(b.positions[t])}")
        # requests and their page tables
        qo, kvp = b.qo_indptr, b.kv_page_indptr
        n_req = b.n_requests
        if n_req < 1 or kvp.shape[0] != n_req + 1 or b.kv_last_page_len.shape[0] != n_req:
            raise bad(f"qo_indptr has {qo.shape[0]} entries and kv_page_indptr {kvp.shape[0]}; "
                      "both need n_requests + 1 >= 2")
        if int(qo[0]) != 0:
            raise bad(f"qo_indptr[0] is {int(qo[0])}; must be 0")
        if int(kvp[0]) != 0:
            raise bad(f"kv_page_indptr[0] is {int(kvp[0])}; must be 0")
        if int(qo[-1]) != b.n_tokens:
            raise bad(f"qo_indptr ends at {int(qo[-1])} but the batch has {b.n_tokens} tokens")
        if int(kvp[-1]) != b.kv_page_indices.shape[0]:
            raise bad("qo_indptr / kv_page_indptr point outside tokens / kv_page_indices")
        for r in range(n_req):
            if qo[r + 1] <= qo[r]:
                raise bad(f"request {r}: qo_indptr must increase ({int(qo[r])} -> {int(qo[r + 1])}); "
                          "every request needs a token")
            if kvp[r + 1] <= kvp[r]:
                raise bad(f"request {r}: kv_page_indptr must increase ({int(kvp[r])} -> {int(kvp[r + 1])}); "
                          "every request needs a page")
        kv_lens, written, n_kv = [], {}, 0  # written: slot -> the request writing it
        for r in range(n_req):
            last = int(b.kv_last_page_len[r])
            if not 1 <= last <= ps:
                raise bad(f"request {r}: last_page_len {last} outside 1..{ps}")
            pages = [int(p) for p in b.kv_page_indices[kvp[r] : kvp[r + 1]]]
            kv_len = (len(pages) - 1) * ps + last
            n_new = int(qo[r + 1] - qo[r])
            if kv_len < n_new:
                raise bad(f"request {r}: KV length {kv_len} is shorter than its {n_new} new tokens")
            seen: set[int] = set()
            for page in pages:
                if not 0 <= page < n_pages:
                    raise bad(f"request {r}: page id {page} out of range (n_pages={n_pages})")
                if page in seen:
                    raise bad(f"request {r}: page {page} listed twice")
                seen.add(page)
            for j in range(kv_len - n_new, kv_len):
                slot = pages[j // ps] * ps + j % ps
                if slot in written:
                    raise bad(f"request {r}: KV slot {j % ps} of page {pages[j // ps]} is written twice in this batch")
                written[slot] = r
            kv_lens.append(kv_len)
            n_kv += kv_len
        if n_kv > info.max_batch_kv:
            raise bad(f"batch attends over {n_kv} KV rows; max_batch_kv is {info.max_batch_kv}")
        for r in range(n_req):  # a request reads only KV no other request of the batch writes
            pages = [int(p) for p in b.kv_page_indices[kvp[r] : kvp[r + 1]]]
            for j in range(kv_lens[r] - int(qo[r + 1] - qo[r])):
                writer = written.get(pages[j // ps] * ps + j % ps)
                if writer is not None:
                    raise bad(f"request {r} reads KV slot {j % ps} of page {pages[j // ps]}, "
                              f"which request {writer} writes in this batch")
        # masks
        if b.mask_indptr is not None:
            runs_all = b.mask_runs if b.mask_runs is not None else np.zeros(0, np.int32)
            if b.mask_indptr.shape[0] != b.n_tokens + 1:
                raise bad(f"mask_indptr has {b.mask_indptr.shape[0]} entries; need n_tokens + 1 = {b.n_tokens + 1}")
            if int(b.mask_indptr.min()) < 0 or int(b.mask_indptr.max()) > runs_all.shape[0]:
                raise bad(f"mask_indptr points outside mask_runs ({runs_all.shape[0]} runs)")
            if int(b.mask_indptr[0]) != 0:
                raise bad(f"mask_indptr[0] is {int(b.mask_indptr[0])}; must be 0")
            for t in range(b.n_tokens):
                if b.mask_indptr[t + 1] < b.mask_indptr[t]:
                    raise bad(f"token {t}: mask_indptr decreases ({int(b.mask_indptr[t])} -> {int(b.mask_indptr[t + 1])})")
            window = info.sliding_window
            for r in range(n_req):
                for t in range(int(qo[r]), int(qo[r + 1])):
                    runs = runs_all[b.mask_indptr[t] : b.mask_indptr[t + 1]]
                    for k, run in enumerate(runs):
                        if run < 0:
                            raise bad(f"token {t}: mask run {k} is negative ({int(run)})")
                    if not len(runs):
                        continue
                    if int(runs.sum()) != kv_lens[r]:
                        raise bad(f"token {t}: mask runs sum to {int(runs.sum())} "
                                  f"but the request's KV length is {kv_lens[r]}")
                    own = kv_lens[r] - int(qo[r + 1] - qo[r]) + (t - int(qo[r]))
                    visible = brle.decode(runs, kv_lens[r])[: own + 1]  # causality hides the rest
                    if not visible.any():
                        raise bad(f"token {t}: its mask hides every KV row, its own included")
                    if window > 0 and not visible[max(0, own - window + 1) :].any():
                        raise bad(f"token {t}: its mask hides every KV row inside the sliding window of {window}")
        # outputs
        n_out = b.n_outputs
        if n_out > info.max_batch_tokens:
            raise bad(f"batch has {n_out} outputs; max_batch_tokens is {info.max_batch_tokens}")
        hidden_only = b.hidden_only and n_out > 0
        if hidden_only and (not b.return_hidden or b.return_logprobs or b.return_logits or b.top_k > 0
                            or b.logit_masks is not None):
            raise bad("PIE_RETURN_HIDDEN_ONLY goes with PIE_RETURN_HIDDEN alone (no other flag, no logit_masks)")
        if not hidden_only and len(b.samplers) != n_out:
            raise bad(f"{len(b.samplers)} samplers for {n_out} output rows")
        for i in range(n_out):
            row = int(b.output_rows[i])
            if not 0 <= row < b.n_tokens:
                raise bad(f"output {i}: row {row} out of range (batch has {b.n_tokens} tokens)")
            if hidden_only:
                continue
            problem = sampler_problem(b.samplers[i])
            if problem:
                raise bad(f"output {i}: sampler {problem}")
        if b.top_k > 0 and b.top_k > vocab:
            raise bad(f"top_k {b.top_k} outside 1..{vocab}")
        if b.logit_masks is not None:
            words = (vocab + 31) // 32
            if b.logit_masks.shape != (n_out, words):
                raise bad(f"logit_masks has shape {b.logit_masks.shape}; need ({n_out}, {words})")
            for i, row_words in enumerate(b.logit_masks):
                if not _bits_to_bool(row_words, vocab).any():
                    raise bad(f"output {i}: the logit mask allows no token")
        return kv_lens

    def _run(self, b: ForwardBatch, kv_lens: list[int]) -> ForwardResult:
        ps = self._info.page_size
        req_of_token = np.repeat(np.arange(b.n_requests), np.diff(b.qo_indptr))
        # write every new token's (token, position) into its slot
        slots_of: list[list[tuple[int, int]]] = []
        for r in range(b.n_requests):
            pages = b.kv_page_indices[b.kv_page_indptr[r] : b.kv_page_indptr[r + 1]]
            slots = [(int(pages[i // ps]), i % ps) for i in range(kv_lens[r])]
            slots_of.append(slots)
            n_new = int(b.qo_indptr[r + 1] - b.qo_indptr[r])
            for i in range(n_new):
                t = int(b.qo_indptr[r]) + i
                page, off = slots[kv_lens[r] - n_new + i]
                self._kv_tok[page, off] = int(b.tokens[t])
                self._kv_pos[page, off] = int(b.positions[t])
        # outputs
        n_out, vocab = b.n_outputs, self._info.n_vocab
        result = ForwardResult(tokens=np.zeros(n_out, dtype=np.int32), row_errors=[None] * n_out)
        if b.return_logprobs:
            result.logprobs = np.zeros(n_out, dtype=np.float32)
        if b.top_k > 0:
            result.top_ids = np.zeros((n_out, b.top_k), dtype=np.int32)
            result.top_probs = np.zeros((n_out, b.top_k), dtype=np.float32)
        if b.return_logits:
            result.logits = np.zeros((n_out, vocab), dtype=np.float32)
        if b.return_hidden:
            result.hidden = np.zeros((n_out, self._info.n_embd), dtype=np.float32)
        for i, row in enumerate(b.output_rows):
            row = int(row)
            r = int(req_of_token[row])
            n_new = int(b.qo_indptr[r + 1] - b.qo_indptr[r])
            own = kv_lens[r] - n_new + (row - int(b.qo_indptr[r]))
            visible = np.zeros(kv_lens[r], dtype=bool)
            visible[: own + 1] = True  # causality
            if b.mask_indptr is not None:
                runs = b.mask_runs[b.mask_indptr[row] : b.mask_indptr[row + 1]]
                if len(runs):
                    visible &= brle.decode(runs, kv_lens[r])
            seen = []
            for idx in np.flatnonzero(visible):
                page, off = slots_of[r][idx]
                if self._kv_tok[page, off] < 0:
                    raise DriverError("invalid_argument", f"request {r} reads KV slot {idx} that was never written")
                seen.append((int(self._kv_tok[page, off]), int(self._kv_pos[page, off])))
            logits = self.logits_for(seen)
            if result.hidden is not None:  # like the logits, a function of the KV the row sees
                result.hidden[i] = logits[: self._info.n_embd]
            if b.hidden_only:  # no LM head: nothing sampled
                continue
            if result.logits is not None:
                result.logits[i] = logits
            mask = None if b.logit_masks is None else _bits_to_bool(b.logit_masks[i], vocab)
            try:
                token = _sample(logits, mask, b.samplers[i])
            except ValueError as exc:  # as in the C driver: this row fails alone, or the call
                error = DriverError("invalid_argument", f"output {i}: {exc}")
                if not b.rows_fail_alone:
                    raise error from None
                result.tokens[i], result.row_errors[i] = -1, error
                continue
            result.tokens[i] = token
            logp = _log_softmax(logits)
            if result.logprobs is not None:
                result.logprobs[i] = logp[token]
            if b.top_k > 0:
                order = np.argsort(-logp, kind="stable")[: b.top_k]
                result.top_ids[i] = order
                result.top_probs[i] = np.exp(logp[order])
        self.stats.calls += 1
        self.stats.tokens += b.n_tokens
        self.stats.batches.append({"n_tokens": b.n_tokens, "n_requests": b.n_requests, "n_outputs": n_out,
                                   "head": n_out > 0 and not b.hidden_only})
        return result

    # ---- page operations --------------------------------------------------------------------------

    def copy_pages(self, src: Sequence[int], dst: Sequence[int]) -> None:
        self._check_open()
        src, dst = self._pages(src), self._pages(dst)
        if len(src) != len(dst):
            raise DriverError("invalid_argument", "copy_pages: src and dst differ in length")
        self._kv_tok[dst] = self._kv_tok[src]
        self._kv_pos[dst] = self._kv_pos[src]
        self.stats.copies += len(src)

    def read_pages(self, pages: Sequence[int]) -> bytes:
        self._check_open()
        out = bytearray()
        for p in self._pages(pages):
            for off in range(self._info.page_size):
                tok, pos = int(self._kv_tok[p, off]), int(self._kv_pos[p, off])
                out += _SLOT.pack(int(tok >= 0), tok, pos)
        self.stats.pages_read += len(pages)
        return bytes(out)

    def write_pages(self, pages: Sequence[int], data: bytes) -> None:
        self._check_open()
        pages = self._pages(pages)
        if len(data) != len(pages) * self._info.page_bytes:
            expected = len(pages) * self._info.page_bytes
            raise DriverError("invalid_argument", f"write_pages: expected {expected} bytes, got {len(data)}")
        for i, p in enumerate(pages):
            for off in range(self._info.page_size):
                _, tok, pos = _SLOT.unpack_from(data, (i * self._info.page_size + off) * _SLOT.size)
                self._kv_tok[p, off], self._kv_pos[p, off] = tok, pos
        self.stats.pages_written += len(pages)

    def _pages(self, pages: Sequence[int]) -> list[int]:
        pages = [int(p) for p in pages]
        for p in pages:
            if not 0 <= p < self._info.n_pages:
                raise DriverError("invalid_argument", f"page id {p} out of range (n_pages={self._info.n_pages})")
        return pages

    # ---- lifecycle -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise DriverError("invalid_argument", "the driver is closed")

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> FakeDriver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Helpers (numpy reference semantics of the C sampler and masks)
# --------------------------------------------------------------------------------------------

def _bits_to_bool(words: np.ndarray, n_vocab: int) -> np.ndarray:
    bits = np.unpackbits(words.astype("<u4").view(np.uint8), bitorder="little")
    return bits[:n_vocab].astype(bool)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def _sample(logits: np.ndarray, allowed: np.ndarray | None, s: SamplingParams) -> int:
    """The token, or ValueError with the C sampler's message when no allowed logit is finite."""
    logits = logits.astype(np.float64)
    candidates = np.isfinite(logits) if allowed is None else np.isfinite(logits) & allowed
    if not candidates.any():
        raise ValueError("every logit is -inf or NaN" if allowed is None
                         else "the logit mask allows no token with a finite logit")
    logits = np.where(candidates, logits, -np.inf)
    if s.is_greedy:
        return int(np.argmax(logits))  # first maximum = lowest id on ties
    logits = logits / s.temperature
    order = np.argsort(-logits, kind="stable")
    if s.top_k > 0:
        order = order[: s.top_k]
    probs = np.exp(logits[order] - logits[order[0]])
    probs /= probs.sum()
    if s.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), s.top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    if s.min_p > 0.0:
        keep = probs >= s.min_p * probs[0]
        order, probs = order[keep], probs[keep] / probs[keep].sum()
    rng = np.random.default_rng(s.seed or 0)
    return int(order[rng.choice(len(order), p=probs)])
