"""`pie-local serve`: the OpenAI-compatible API and the inferlet API over one Engine per model.

Modules: app (the ASGI app and its guard), manager (engines per model, keep-alive), schema
(request checks), generation (one request's generation), openai_routes, programs (inferlet
routes), streaming (SSE, disconnects), tool_calls, record (where the server listens), client
(`pie_local.Client`). Names are imported lazily so `import pie_local.server` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_app": "app", "ServerConfig": "config", "ModelManager": "manager",
    "Client": "client", "ClientError": "client", "RemoteInferlet": "client", "RemoteInferletError": "client",
    "ServerNotFound": "client", "ServerRecord": "record", "find_server": "record",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pie_local.server' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pie_local.server.{module}"), name)
