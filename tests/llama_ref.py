"""Reference forward passes through llama-cpp-python's low-level API (the C functions, no Llama class).

Tests compare the pie driver's logits with these; benchmarks/bench_driver.py uses the same
setup as its baseline. Weights stay in the plain CPU buffer type (``use_extra_bufts = False``:
ggml's AMX buffer type crashes on CPUs that advertise AMX inside VMs that do not enable it)
unless ``extra_bufts=True`` asks for llama.cpp's extra buffer types (CPU_REPACK), which callers
do only where ``pie_local.bench.machine.extra_bufts_safe()`` allows; llama.cpp's logs go to
Python logging instead of stderr.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Collection, Iterable, Sequence

import llama_cpp
import numpy as np

_GGML_TYPES = {"f16": 1, "q8_0": 8}  # ggml_type values for the KV cache
_backend_ready = False


class _TensorHead(ctypes.Structure):
    """The leading fields of ggml.h's struct ggml_tensor (stable across ggml versions)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
    ]


def _ggml_base() -> ctypes.CDLL:
    """libggml-base as llama_cpp loaded it, for reading tensors in llama.cpp's eval callback."""
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_is_contiguous.restype = ctypes.c_bool
    lib.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


def _init_backend() -> None:
    """llama.cpp's logs go where pie-local sends them (Python logging), then the backend starts."""
    global _backend_ready
    if not _backend_ready:
        from pie_local.llama_logs import route_llama_logs

        route_llama_logs()
        llama_cpp.llama_backend_init()
        _backend_ready = True


class LlamaRef:
    """One llama.cpp model + context. Sequences are llama.cpp seq ids 0 .. n_seq_max-1.

    ``decode`` is the primitive (tokens with explicit positions and seq ids, logits for chosen
    rows); ``logits`` and ``greedy`` are conveniences on top of it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_seq_max: int = 1,
        n_threads: int = 2,
        flash_attn: bool | None = None,
        kv_type: str = "f16",
        embeddings: bool = False,
        pooling: int = 0,
        capture: Collection[str] = (),
        extra_bufts: bool = False,
    ) -> None:
        """flash_attn None lets llama.cpp choose (its default); kv_type "f16" or "q8_0";
        embeddings=True makes hidden() available (final hidden state after the output norm), and with
        pooling (llama_pooling_type: 1 mean, 2 cls, 3 last) pooled(), llama.cpp's own pooling;
        capture: names of llama.cpp's intermediate tensors ("l_out-0", ...) that each decode
        stores in ``activations`` (float32, numpy order: tokens first); extra_bufts=True loads
        the weights the way llama.cpp does by default (repacked where its CPU kernels take them)."""
        _init_backend()
        mparams = llama_cpp.llama_model_default_params()
        mparams.use_extra_bufts = extra_bufts
        # the driver under test runs on the GPU when there is one; scripts/gpu_check.sh sets this
        # so the oracle runs on the same device (0, the CPU, otherwise)
        mparams.n_gpu_layers = int(os.environ.get("PIE_LLAMA_GPU_LAYERS", "0"))
        self.model = llama_cpp.llama_model_load_from_file(str(Path(path)).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(llama_cpp.llama_model_n_embd(self.model))

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq_max
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.swa_full = True  # keep every SWA cell: plain sliding-window semantics, no eviction
        cparams.kv_unified = True
        if flash_attn is not None:
            cparams.flash_attn_type = 1 if flash_attn else 0
        cparams.type_k = cparams.type_v = _GGML_TYPES[kv_type]
        cparams.embeddings = embeddings
        cparams.pooling_type = pooling  # 0 = LLAMA_POOLING_TYPE_NONE: one embedding per token
        self.activations: dict[str, np.ndarray] = {}
        if capture:
            self._eval_cb = self._capture_callback(set(capture))  # C holds the pointer: keep it
            cparams.cb_eval = self._eval_cb
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        self.n_batch = n_batch
        self.n_seq_max = n_seq_max
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, n_seq_max)

    def _capture_callback(self, names: set[str]) -> object:
        ggml = _ggml_base()

        @llama_cpp.ggml_backend_sched_eval_callback
        def on_tensor(t: int, ask: bool, _user: object) -> bool:
            head = _TensorHead.from_address(t)
            name = ggml.ggml_get_name(t).decode()
            if ask:  # contiguous f32 only; a name may recur (Qcur before and after RoPE): the last wins
                return head.type == 0 and name in names and bool(ggml.ggml_is_contiguous(t))
            shape = [int(head.ne[i]) for i in (3, 2, 1, 0)]
            while len(shape) > 2 and shape[0] == 1:
                shape.pop(0)
            out = np.empty(shape, dtype=np.float32)
            ggml.ggml_backend_tensor_get(t, out.ctypes.data, 0, out.nbytes)
            self.activations[name] = out
            return True

        return on_tensor

    # --- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.ctx)
            llama_cpp.llama_model_free(self.model)
            self.ctx = None
            self.model = None

    def __enter__(self) -> "LlamaRef":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset(self, seq_id: int | None = None) -> None:
        """Forgets the KV of one sequence (or of all with None)."""
        mem = llama_cpp.llama_get_memory(self.ctx)
        if seq_id is None:
            llama_cpp.llama_memory_clear(mem, True)
        else:
            llama_cpp.llama_memory_seq_rm(mem, seq_id, -1, -1)

    # --- forward ---------------------------------------------------------------------------

    def decode(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        seq_ids: Sequence[int],
        output_rows: Iterable[int] = (),
        logits: bool = True,
    ) -> np.ndarray:
        """One llama_decode of up to n_batch tokens; returns float32 [len(output_rows), n_vocab]
        (logits=False: the rows are output for hidden(), no logits are read: embedding models
        have none; returns [len(output_rows), 0])."""
        n = len(tokens)
        if not 0 < n <= self.n_batch:
            raise ValueError(f"decode takes 1..{self.n_batch} tokens, got {n}")
        rows = list(output_rows)
        wanted = set(rows)
        b = self._batch
        b.n_tokens = n
        for i in range(n):
            b.token[i] = int(tokens[i])
            b.pos[i] = int(positions[i])
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = int(seq_ids[i])
            b.logits[i] = 1 if i in wanted else 0
        status = llama_cpp.llama_decode(self.ctx, b)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        out = np.empty((len(rows), self.n_vocab if logits else 0), dtype=np.float32)
        for j, row in enumerate(rows if logits else ()):
            ptr = llama_cpp.llama_get_logits_ith(self.ctx, row)
            out[j] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return out

    def hidden(self, rows: Iterable[int]) -> np.ndarray:
        """Final hidden states of the given rows of the last decode (needs embeddings=True)."""
        out = []
        for row in rows:
            ptr = llama_cpp.llama_get_embeddings_ith(self.ctx, row)
            if not ptr:
                raise RuntimeError(f"no embedding for row {row} (was the context made with embeddings=True?)")
            out.append(np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy())
        return np.stack(out)

    def pooled(self, seq_id: int = 0) -> np.ndarray:
        """Sequence seq_id's pooled embedding after the last decode (needs embeddings=True, pooling > 0)."""
        ptr = llama_cpp.llama_get_embeddings_seq(self.ctx, seq_id)
        if not ptr:
            raise RuntimeError(f"no pooled embedding for sequence {seq_id} (embeddings=True and a pooling?)")
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy()

    def unit_embeddings(self, texts: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """Each text alone (tokenized as the model asks), pooled and scaled to unit length in
        float64: [n_texts, n_embd], and the token count of each (needs embeddings=True, pooling > 0)."""
        out, counts = [], []
        for text in texts:
            ids = self.tokenize(text)
            self.reset()
            self.decode(ids, range(len(ids)), [0] * len(ids))
            v = self.pooled(0).astype(np.float64)
            out.append(v / np.linalg.norm(v))
            counts.append(len(ids))
        return np.stack(out), counts

    def logits(
        self, tokens: Sequence[int], *, start_pos: int = 0, seq_id: int = 0, rows: str | Sequence[int] = "all"
    ) -> np.ndarray:
        """Appends `tokens` to sequence `seq_id` at positions start_pos.. and returns the logits of
        `rows` ("all", "last", or indices into tokens) as float32 [n_rows, n_vocab]."""
        n = len(tokens)
        if rows == "all":
            want = list(range(n))
        elif rows == "last":
            want = [n - 1]
        else:
            want = list(rows)  # type: ignore[arg-type]
        pieces = []
        for lo in range(0, n, self.n_batch):
            hi = min(n, lo + self.n_batch)
            chunk_rows = [r - lo for r in want if lo <= r < hi]
            pieces.append(
                self.decode(tokens[lo:hi], range(start_pos + lo, start_pos + hi), [seq_id] * (hi - lo), chunk_rows)
            )
        return np.concatenate(pieces, axis=0)

    def greedy(self, prompt: Sequence[int], n_new: int, *, seq_id: int = 0) -> list[int]:
        """Prefills `prompt` into a fresh sequence and decodes n_new tokens by argmax."""
        self.reset(seq_id)
        last = self.logits(prompt, seq_id=seq_id, rows="last")[0]
        out: list[int] = []
        pos = len(prompt)
        for _ in range(n_new):
            token = int(np.argmax(last))
            out.append(token)
            last = self.decode([token], [pos], [seq_id], [0])[0]
            pos += 1
        return out

    # --- text ------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        data = text.encode()
        buf = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, len(buf), add_bos, False)
        if n < 0:
            raise ValueError(f"tokenize needs {-n} slots")
        return list(buf[:n])

    def detokenize(self, tokens: Sequence[int]) -> str:
        arr = (llama_cpp.llama_token * max(1, len(tokens)))(*tokens)
        buf = ctypes.create_string_buffer(64 * len(tokens) + 64)
        n = llama_cpp.llama_detokenize(self.vocab, arr, len(tokens), buf, len(buf), False, False)
        if n < 0:
            raise ValueError("detokenize buffer too small")
        return buf.raw[:n].decode("utf-8", "replace")

    def greedy_text(self, prompt: str, n_new: int) -> str:
        return self.detokenize(self.greedy(self.tokenize(prompt), n_new))


def compare_embeddings(record_property, label: str, got: Sequence, want: np.ndarray, counts: list[int],
                       pooling: str, tol: float) -> np.ndarray:
    """The engine's embeddings (pie_local Embedding objects) against llama.cpp's unit vectors
    (LlamaRef.unit_embeddings): pooling, token counts, unit length, max |diff| <= tol (recorded
    and printed as `label`). Returns the vectors as float64 [n, n_embd]."""
    assert [e.pooling for e in got] == [pooling] * len(got)
    assert [e.n_tokens for e in got] == counts
    vectors = np.stack([e.vector for e in got]).astype(np.float64)
    diff = float(np.abs(vectors - want).max())
    record_property(f"{label}.max_abs_diff", diff)
    print(f"{label}: max |diff| {diff:.3g}")
    assert diff <= tol
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    return vectors
