"""The C sampler on its own: sampler.c and status.c compiled into a small library (the flags of
the driver's build for sampler.c), called through ctypes. Used by the sampler's unit tests and by
benchmarks/bench_sampler.py."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "native" / "ggml_driver"

# native/ggml_driver/CMakeLists.txt compiles sampler.c with these (plus -march=native when ggml
# itself was built for the native CPU; -fno-tree-pre is GCC's); OpenMP samples the rows of
# pie_sample_rows in parallel.
CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
CFLAGS = ["-std=c11", "-O3", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp", "-Wall", "-Wextra", "-Werror"]
if CC and "clang" not in Path(CC).resolve().name:
    CFLAGS.append("-fno-tree-pre")


class Sampler(ctypes.Structure):
    # Mirrors pie_sampler in pie_driver.h (this small library exports no struct sizes).
    _fields_ = [
        ("temperature", ctypes.c_float),
        ("top_k", ctypes.c_int32),
        ("top_p", ctypes.c_float),
        ("min_p", ctypes.c_float),
        ("seed", ctypes.c_uint64),
    ]


def build(out: Path, *, source: Path = NATIVE, cflags: list[str] | None = None) -> Path:
    """Compiles `source`/src/sampler.c and status.c into the shared library `out`."""
    if CC is None:
        raise FileNotFoundError("no C compiler to build the sampler library")
    subprocess.run(
        [CC, *(CFLAGS if cflags is None else cflags), "-shared", "-fPIC", f"-I{source / 'include'}",
         f"-I{source / 'src'}", str(source / "src" / "sampler.c"), str(source / "src" / "status.c"),
         "-o", str(out), "-lm"],
        check=True,
    )  # fmt: skip
    return out


class SamplerLib:
    """pie_sample_row / pie_sample_rows with numpy in and out."""

    def __init__(self, path: Path, n_vocab_max: int = 300_000) -> None:
        self.lib = ctypes.CDLL(str(path))
        self.lib.pie_sampler_scratch_new.restype = ctypes.c_void_p
        self.lib.pie_sampler_scratch_new.argtypes = [ctypes.c_int32]
        self.lib.pie_sampler_scratch_free.argtypes = [ctypes.c_void_p]
        self.lib.pie_last_error.restype = ctypes.c_char_p
        self.lib.pie_sample_row.restype = ctypes.c_int32
        self.lib.pie_sample_row.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.POINTER(Sampler),
            ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_float),
            ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        self.has_rows = hasattr(self.lib, "pie_sample_rows")  # an older sampler.c may lack it
        if self.has_rows:
            self.lib.pie_sample_rows.restype = ctypes.c_int32
            self.lib.pie_sample_rows.argtypes = [
                ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p,
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p,
                ctypes.c_void_p, ctypes.c_void_p,
            ]  # fmt: skip
        self.scratch = self.lib.pie_sampler_scratch_new(n_vocab_max)

    def close(self) -> None:
        self.lib.pie_sampler_scratch_free(self.scratch)

    def sample(
        self,
        logits: np.ndarray,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: int = 0,
        mask: np.ndarray | None = None,
        return_top: int = 0,
        logprob: bool = True,
    ) -> tuple[int, float, np.ndarray, np.ndarray]:
        """(token, logprob, top ids, top probs); raises ValueError("status: message") on failure."""
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        sampler = Sampler(temperature, top_k, top_p, min_p, seed)
        token = ctypes.c_int32(-1)
        lp = ctypes.c_float(np.nan)
        top_ids = np.zeros(max(return_top, 1), dtype=np.int32)
        top_probs = np.zeros(max(return_top, 1), dtype=np.float32)
        mask_ptr = None
        if mask is not None:
            mask = np.ascontiguousarray(mask, dtype=np.uint32)
            mask_ptr = mask.ctypes.data
        status = self.lib.pie_sample_row(
            self.scratch, logits.ctypes.data, logits.shape[0], mask_ptr, ctypes.byref(sampler),
            ctypes.byref(token), ctypes.byref(lp) if logprob else None, return_top, top_ids.ctypes.data,
            top_probs.ctypes.data,
        )  # fmt: skip
        if status != 0:
            raise ValueError(f"{status}: {self.lib.pie_last_error().decode()}")
        return token.value, lp.value, top_ids[:return_top], top_probs[:return_top]

    def sample_rows(
        self, logits: np.ndarray, samplers: list[dict], *, threads: int, masks: np.ndarray | None = None,
        return_top: int = 0, logprob: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """pie_sample_rows over logits [n_rows, n_vocab]: (tokens, statuses, logprobs, top ids, top probs)."""
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        n_rows, n_vocab = logits.shape
        arr = (Sampler * n_rows)(*[Sampler(s.get("temperature", 0.0), s.get("top_k", 0), s.get("top_p", 1.0),
                                           s.get("min_p", 0.0), s.get("seed", 0)) for s in samplers])  # fmt: skip
        tokens = np.full(n_rows, -1, dtype=np.int32)
        status = np.zeros(n_rows, dtype=np.int32)
        lps = np.zeros(n_rows, dtype=np.float32)
        top_ids = np.zeros((n_rows, max(return_top, 1)), dtype=np.int32)
        top_probs = np.zeros((n_rows, max(return_top, 1)), dtype=np.float32)
        if masks is not None:
            masks = np.ascontiguousarray(masks, dtype=np.uint32)
        rc = self.lib.pie_sample_rows(
            self.scratch, threads, n_rows, logits.ctypes.data, n_vocab, None if masks is None else masks.ctypes.data,
            ctypes.addressof(arr), tokens.ctypes.data, lps.ctypes.data if logprob else None, return_top,
            top_ids.ctypes.data, top_probs.ctypes.data, status.ctypes.data,
        )  # fmt: skip
        if rc != 0:
            raise ValueError(f"{rc}: {self.lib.pie_last_error().decode()}")
        return tokens, status, lps, top_ids[:, :return_top], top_probs[:, :return_top]


def allow_mask(n_vocab: int, allowed: list[int] | np.ndarray) -> np.ndarray:
    bits = np.zeros(n_vocab, dtype=bool)
    bits[np.asarray(allowed)] = True
    padded = np.zeros((n_vocab + 31) // 32 * 32, dtype=bool)
    padded[:n_vocab] = bits
    return np.packbits(padded.reshape(-1, 32)[:, ::-1], axis=1).view(">u4").astype(np.uint32).ravel()
