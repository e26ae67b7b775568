"""The model driver: ``Driver`` runs batched forward passes on the native ggml driver.

Importing this package routes llama.cpp's logging to Python logging ("pie_local.llama_cpp").
``FakeDriver`` (same interface, no native code) lives in ``pie_local.driver.fake``.
"""

from pie_local.driver import _lib
from pie_local.driver.driver import Driver
from pie_local.driver.types import DriverError, DriverParams, ForwardBatch, ForwardResult, ModelInfo, SamplerParams

_lib.route_llama_cpp_logs()

__all__ = ["Driver", "DriverError", "DriverParams", "ForwardBatch", "ForwardResult", "ModelInfo", "SamplerParams"]
