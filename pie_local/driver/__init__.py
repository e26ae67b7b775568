"""The model driver: ``Driver`` runs batched forward passes on the native ggml driver.

The shared types (``ForwardBatch``, ``DriverParams``, ...) import cheaply; ``Driver`` and the
library loader are imported on first use, so the runtime (and its ``FakeDriver``, in
``pie_local.driver.fake``) never pays for ctypes bindings or llama-cpp-python. llama.cpp's
logging goes to Python logging ("pie_local.llama_cpp") before any pie-local code uses
llama_cpp: ``_lib.load()`` routes it when the first ``Driver`` is created, the tokenizer when it
loads a vocabulary, and this package at import when llama_cpp is already imported.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from pie_local.driver.types import (DeviceUse, DriverError, DriverParams, ForwardBatch, ForwardResult, ModelDriver,
                                    ModelInfo, SamplingParams)

__all__ = [
    "DeviceUse",
    "Driver",
    "DriverError",
    "DriverParams",
    "ForwardBatch",
    "ForwardResult",
    "ModelDriver",
    "ModelInfo",
    "SamplingParams",
    "supported_architectures",
]


def supported_architectures() -> tuple[str, ...]:
    """The ``general.architecture`` values the native driver runs (``("llama", "qwen2", ...)``),
    from its own table; loads the library on first use (``_lib.DriverNotFound`` without one)."""
    lib = importlib.import_module("pie_local.driver._lib").load()
    return tuple(lib.pie_arch_name(i).decode() for i in range(lib.pie_arch_count()))


def __getattr__(name: str) -> Any:
    if name == "Driver":
        return importlib.import_module("pie_local.driver.driver").Driver
    raise AttributeError(f"module 'pie_local.driver' has no attribute {name!r}")


if "llama_cpp" in sys.modules:  # already paid for: take its logs now, before anyone else logs
    importlib.import_module("pie_local.llama_logs").route_llama_logs()
