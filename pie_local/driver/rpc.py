"""ggml's RPC backend through the native driver: whether this ggml has it, and serving this
machine's devices to other processes (`pie-local worker`). Connecting to workers is a
``DriverParams.rpc`` matter: the driver does it when it loads a model."""

from __future__ import annotations

from pie_local.driver import _ffi, _lib
from pie_local.driver.types import DriverError

# How to get a ggml with the RPC backend (the README's install does this).
INSTALL_HINT = ('CMAKE_ARGS="-DGGML_RPC=ON" pip install --force-reinstall --no-deps --no-cache-dir '
                '--no-binary llama-cpp-python llama-cpp-python==0.3.36')


def available() -> bool:
    """Whether the installed ggml has its RPC backend."""
    return bool(_lib.load().pie_rpc_available())


def protocol_version() -> str:
    """The ggml RPC protocol version this ggml speaks ("major.minor.patch"); workers must match."""
    return _lib.load().pie_rpc_version().decode()


def serve(endpoint: str, threads: int) -> None:
    """Serves this machine's devices at ``endpoint`` ("host:port") until the process ends.
    Raises DriverError when it cannot start (no RPC backend, a bad endpoint, the port taken)."""
    lib = _lib.load()
    status = lib.pie_rpc_serve(endpoint.encode(), threads)
    raise DriverError(_ffi.STATUS_NAMES.get(status, f"status {status}"), lib.pie_last_error().decode("utf-8", "replace"))
