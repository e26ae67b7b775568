"""``Driver``: one loaded model on the native driver. numpy in, numpy out; every failure is a
``DriverError`` carrying the driver's status name and message. ``forward`` runs with the GIL
released (ctypes releases it for the call), so the runtime's event loop keeps going."""

from __future__ import annotations

import ctypes as C
import os
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from pie_local.driver import _ffi, _lib
from pie_local.driver.types import DeviceUse, DriverError, DriverParams, ForwardBatch, ForwardResult, ModelInfo

_KV_NAMES = {v: k for k, v in _ffi.KV_TYPES.items()}


def _i32(a: Any, name: str) -> np.ndarray:
    arr = np.ascontiguousarray(a, dtype=np.int32)
    if arr.ndim != 1:
        raise DriverError("invalid_argument", f"{name} must be one-dimensional (got shape {arr.shape})")
    return arr


def _ptr(arr: np.ndarray | None, ctype: Any) -> Any:
    return None if arr is None else arr.ctypes.data_as(C.POINTER(ctype))


def c_params(lib: C.CDLL, p: DriverParams) -> _ffi.ModelParams:
    """``DriverParams`` as the C struct, with the checks only Python can make (string sizes)."""
    if p.kv_type not in _ffi.KV_TYPES:
        raise DriverError("invalid_argument", f"kv_type must be one of {sorted(_ffi.KV_TYPES)} (got {p.kv_type!r})")
    device = p.device.encode()
    if len(device) >= 32:
        raise DriverError("invalid_argument", f"device name too long: {p.device!r}")
    rpc = ",".join(w.strip() for w in p.rpc).encode()
    if len(rpc) >= 256:
        raise DriverError("invalid_argument", f"RPC worker list too long ({len(rpc)} bytes; at most 255)")
    if len(p.tensor_split) > _ffi.MAX_DEVICES:
        raise DriverError("invalid_argument", f"tensor_split has {len(p.tensor_split)} shares; at most {_ffi.MAX_DEVICES}")
    cp = lib.pie_model_default_params()
    cp.n_threads = p.n_threads
    cp.device = device
    cp.page_size = p.page_size
    cp.n_pages = p.n_pages
    cp.kv_type = _ffi.KV_TYPES[p.kv_type]
    cp.max_batch_tokens = p.max_batch_tokens
    cp.max_batch_kv = p.max_batch_kv
    cp.use_mmap = int(p.use_mmap)
    cp.repack = int(p.repack)
    cp.own_kernels = int(p.own_kernels)
    cp.n_gpu_layers = p.n_gpu_layers
    cp.rpc = rpc
    for i, share in enumerate(p.tensor_split):
        cp.tensor_split[i] = float(share)
    return cp


def _device_uses(raw: Any, n: int) -> list[DeviceUse]:
    return [
        DeviceUse(name=u.name.decode("utf-8", "replace"), description=u.description.decode("utf-8", "replace"),
                  is_cpu=bool(u.is_cpu), layers=range(u.first_layer, u.first_layer + u.n_layers) if u.n_layers else range(0),
                  input=bool(u.input), output=bool(u.output), weight_bytes=u.weight_bytes, kv_bytes=u.kv_bytes,
                  compute_bytes=u.compute_bytes, free_bytes=u.free_bytes, total_bytes=u.total_bytes)
        for u in raw[:n]
    ]


def _status_error(lib: C.CDLL, status: int) -> DriverError:
    name = _ffi.STATUS_NAMES.get(status, f"status {status}")
    return DriverError(name, lib.pie_last_error().decode("utf-8", "replace"))


def plan_devices(path: str | os.PathLike[str], params: DriverParams | None = None) -> list[DeviceUse]:
    """Where ``Driver(path, params)`` would put the model, from its metadata alone (nothing is
    loaded; RPC workers are asked for their memory). Offload devices first, the CPU last."""
    lib = _lib.load()
    raw = (_ffi.DeviceUse * _ffi.MAX_DEVICES)()
    n = C.c_int32()
    status = lib.pie_plan_devices(os.fsencode(os.fspath(path)), C.byref(c_params(lib, params or DriverParams())), raw,
                                  _ffi.MAX_DEVICES, C.byref(n))
    if status != _ffi.OK:
        raise _status_error(lib, status)
    return _device_uses(raw, n.value)


class Driver:
    """A GGUF model loaded by libpie_driver with its own paged KV pool."""

    def __init__(self, path: str | os.PathLike[str], params: DriverParams | None = None) -> None:
        self._lib = _lib.load()
        self._handle = C.c_void_p()
        self._lock = threading.Lock()  # the C driver runs one call per model at a time
        p = params or DriverParams()
        cp = c_params(self._lib, p)
        self._check(self._lib.pie_model_load(os.fsencode(os.fspath(path)), C.byref(cp), C.byref(self._handle)))
        raw = _ffi.ModelInfo()
        self._check(self._lib.pie_model_get_info(self._handle, C.byref(raw)))
        self._info = ModelInfo(
            arch=raw.arch.decode(),
            name=raw.name.decode("utf-8", "replace"),
            backend=raw.backend.decode(),
            n_vocab=raw.n_vocab,
            n_ctx_train=raw.n_ctx_train,
            n_embd=raw.n_embd,
            n_layer=raw.n_layer,
            n_head=raw.n_head,
            n_head_kv=raw.n_head_kv,
            head_dim=raw.head_dim,
            sliding_window=raw.sliding_window,
            page_size=raw.page_size,
            n_pages=raw.n_pages,
            kv_type=_KV_NAMES.get(raw.kv_type, str(raw.kv_type)),
            max_batch_tokens=raw.max_batch_tokens,
            max_batch_kv=p.max_batch_kv if p.max_batch_kv > 0 else raw.n_pages * raw.page_size,
            n_params=raw.n_params,
            weight_bytes=raw.weight_bytes,
            kv_bytes=raw.kv_bytes,
            page_bytes=raw.page_bytes,
            n_repacked=raw.n_repacked,
            embedding_only=bool(raw.embedding_only),
        )

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def threads(self) -> int:
        """CPU threads the next forward pass runs (with n_threads <= 0 it follows the load)."""
        with self._lock:
            return int(self._lib.pie_model_threads(self._handle)) if self._handle else 0

    def close(self) -> None:
        with self._lock:
            if self._handle:
                self._lib.pie_model_free(self._handle)
                self._handle = C.c_void_p()

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_handle", None):
            self.close()

    def devices(self) -> list[DeviceUse]:
        """What each device holds of this model: offload devices first, the CPU last."""
        raw = (_ffi.DeviceUse * _ffi.MAX_DEVICES)()
        n = C.c_int32()
        with self._lock:
            self._check(self._lib.pie_model_devices(self._live(), raw, _ffi.MAX_DEVICES, C.byref(n)))
        return _device_uses(raw, n.value)

    def _check(self, status: int) -> None:
        if status != _ffi.OK:
            raise _status_error(self._lib, status)

    def _live(self) -> C.c_void_p:
        if not self._handle:
            raise DriverError("invalid_argument", "the driver is closed")
        return self._handle

    # -- forward --------------------------------------------------------------------------------

    def forward(self, batch: ForwardBatch) -> ForwardResult:
        self._live()
        info = self._info
        keep: list[np.ndarray] = []  # arrays whose memory the C struct points at

        def arr(a: Any, name: str) -> np.ndarray:
            out = _i32(a, name)
            keep.append(out)
            return out

        tokens = arr(batch.tokens, "tokens")
        positions = arr(batch.positions, "positions")
        if positions.shape != tokens.shape:
            raise DriverError("invalid_argument", f"{len(positions)} positions for {len(tokens)} tokens")
        qo = arr(batch.qo_indptr, "qo_indptr")
        kv_indptr = arr(batch.kv_page_indptr, "kv_page_indptr")
        n_req = len(qo) - 1
        if n_req < 1 or len(kv_indptr) != n_req + 1:
            raise DriverError(
                "invalid_argument",
                f"qo_indptr has {len(qo)} entries and kv_page_indptr {len(kv_indptr)}; both need n_requests + 1 >= 2",
            )
        last = arr(batch.kv_last_page_len, "kv_last_page_len")
        pages = arr(batch.kv_page_indices, "kv_page_indices")
        if len(last) != n_req:
            raise DriverError("invalid_argument", f"kv_last_page_len has {len(last)} entries for {n_req} requests")
        # the C side trusts array lengths it cannot see: keep every indptr inside its array
        if int(kv_indptr.max()) > len(pages) or int(qo.max()) > len(tokens) or kv_indptr.min() < 0 or qo.min() < 0:
            raise DriverError("invalid_argument", "qo_indptr / kv_page_indptr point outside tokens / kv_page_indices")
        out_rows = arr(batch.output_rows, "output_rows")
        n_out = len(out_rows)
        if len(batch.samplers) != n_out:
            raise DriverError("invalid_argument", f"{len(batch.samplers)} samplers for {n_out} output rows")

        b = _ffi.Batch()
        b.n_tokens = len(tokens)
        b.tokens = _ptr(tokens, C.c_int32)
        b.positions = _ptr(positions, C.c_int32)
        b.n_requests = n_req
        b.qo_indptr = _ptr(qo, C.c_int32)
        b.kv_page_indices = _ptr(pages, C.c_int32)
        b.kv_page_indptr = _ptr(kv_indptr, C.c_int32)
        b.kv_last_page_len = _ptr(last, C.c_int32)
        if batch.mask_indptr is not None:
            mask_indptr = arr(batch.mask_indptr, "mask_indptr")
            runs = arr(batch.mask_runs if batch.mask_runs is not None else [], "mask_runs")
            if len(mask_indptr) != len(tokens) + 1:
                raise DriverError(
                    "invalid_argument",
                    f"mask_indptr has {len(mask_indptr)} entries; need n_tokens + 1 = {len(tokens) + 1}",
                )
            if mask_indptr.min() < 0 or int(mask_indptr.max()) > len(runs):
                raise DriverError("invalid_argument", f"mask_indptr points outside mask_runs ({len(runs)} runs)")
            b.mask_indptr = _ptr(mask_indptr, C.c_int32)
            b.mask_runs = _ptr(runs, C.c_int32)

        b.n_outputs = n_out
        b.output_rows = _ptr(out_rows, C.c_int32)
        samplers = (_ffi.Sampler * max(n_out, 1))()
        for i, s in enumerate(batch.samplers):
            samplers[i] = _ffi.Sampler(temperature=float(s.temperature), top_k=int(s.top_k), top_p=float(s.top_p),
                                       min_p=float(s.min_p), seed=int(s.seed or 0) & (2**64 - 1))
        b.samplers = C.cast(samplers, C.POINTER(_ffi.Sampler))
        if batch.logit_masks is not None:
            words = (info.n_vocab + 31) // 32
            masks = np.ascontiguousarray(batch.logit_masks, dtype=np.uint32)
            if masks.shape != (n_out, words):
                raise DriverError("invalid_argument", f"logit_masks has shape {masks.shape}; need ({n_out}, {words})")
            keep.append(masks)
            b.logit_masks = _ptr(masks, C.c_uint32)

        res = ForwardResult(tokens=np.zeros(n_out, dtype=np.int32))
        b.out_tokens = _ptr(res.tokens, C.c_int32)
        flags = 0
        if batch.return_logprobs:
            flags |= _ffi.RETURN_LOGPROB
            res.logprobs = np.zeros(n_out, dtype=np.float32)
            b.out_logprobs = _ptr(res.logprobs, C.c_float)
        if batch.top_k > 0:
            flags |= _ffi.RETURN_TOP_K
            b.top_k = batch.top_k
            res.top_ids = np.zeros((n_out, batch.top_k), dtype=np.int32)
            res.top_probs = np.zeros((n_out, batch.top_k), dtype=np.float32)
            b.out_top_ids = _ptr(res.top_ids, C.c_int32)
            b.out_top_probs = _ptr(res.top_probs, C.c_float)
        if batch.return_logits:
            flags |= _ffi.RETURN_LOGITS
            res.logits = np.zeros((n_out, info.n_vocab), dtype=np.float32)
            b.out_logits = _ptr(res.logits, C.c_float)
        if batch.return_hidden:
            flags |= _ffi.RETURN_HIDDEN
            res.hidden = np.zeros((n_out, info.n_embd), dtype=np.float32)
            b.out_hidden = _ptr(res.hidden, C.c_float)
        if batch.hidden_only:
            flags |= _ffi.RETURN_HIDDEN_ONLY
        b.return_flags = flags
        status = np.zeros(max(n_out, 1), dtype=np.int32)  # pie_batch.out_status: rows fail alone
        errors = C.create_string_buffer(max(n_out, 1) * _ffi.ROW_ERROR_SIZE)
        if batch.rows_fail_alone:
            b.out_status = _ptr(status, C.c_int32)
            b.out_errors = C.cast(errors, C.c_char_p)

        with self._lock:
            self._check(self._lib.pie_forward(self._live(), C.byref(b)))
        res.row_errors = [None if code == _ffi.OK else self._row_error(int(code), errors.raw, i)
                          for i, code in enumerate(status[:n_out])]
        return res

    @staticmethod
    def _row_error(code: int, raw: bytes, row: int) -> DriverError:
        message = raw[row * _ffi.ROW_ERROR_SIZE : (row + 1) * _ffi.ROW_ERROR_SIZE].split(b"\0", 1)[0]
        return DriverError(_ffi.STATUS_NAMES.get(code, f"status {code}"), message.decode("utf-8", "replace"))

    # -- pages ----------------------------------------------------------------------------------

    def copy_pages(self, src: Sequence[int], dst: Sequence[int]) -> None:
        s, d = _i32(src, "src"), _i32(dst, "dst")
        if len(s) != len(d):
            raise DriverError("invalid_argument", f"copy_pages got {len(s)} sources and {len(d)} destinations")
        with self._lock:
            self._check(self._lib.pie_copy_pages(self._live(), len(s), _ptr(s, C.c_int32), _ptr(d, C.c_int32)))

    def read_pages(self, pages: Sequence[int]) -> bytes:
        p = _i32(pages, "pages")
        buf = C.create_string_buffer(len(p) * self._info.page_bytes)
        with self._lock:
            self._check(self._lib.pie_read_pages(self._live(), len(p), _ptr(p, C.c_int32), buf, len(buf)))
        return buf.raw

    def write_pages(self, pages: Sequence[int], data: bytes) -> None:
        p = _i32(pages, "pages")
        raw = bytes(data)
        with self._lock:
            self._check(self._lib.pie_write_pages(self._live(), len(p), _ptr(p, C.c_int32), raw, len(raw)))

    # -- debugging ------------------------------------------------------------------------------

    @contextmanager
    def activations(self, names: Collection[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Collects named intermediate tensors (llama.cpp's names: "attn_norm-0", "l_out-0",
        "result_norm", ...; see pie_set_activation_callback in pie_driver.h) from the forward
        passes run inside the block: name -> float32 array in numpy order (tokens first, at least
        two dimensions); a later pass replaces an earlier one's. ``names`` None takes every f32
        tensor, ggml's unnamed ones too ("node_12", ...). Passes get slower; results do not change."""
        found: dict[str, np.ndarray] = {}

        @_ffi.ACTIVATION_CALLBACK
        def on_tensor(name: bytes, ne: Any, data: Any, _user: Any) -> int:
            key = name.decode()
            if not data:
                return int(names is None or key in names)
            shape = [int(ne[i]) for i in (3, 2, 1, 0)]
            while len(shape) > 2 and shape[0] == 1:
                shape.pop(0)
            found[key] = np.ctypeslib.as_array(data, shape=(int(np.prod(shape)),)).reshape(shape).copy()
            return 0

        with self._lock:
            self._check(self._lib.pie_set_activation_callback(self._live(), on_tensor, None))
        try:
            yield found
        finally:
            with self._lock:
                if self._handle:
                    self._check(self._lib.pie_set_activation_callback(self._handle, _ffi.ACTIVATION_CALLBACK(), None))
