"""pie-local: a programmable inference engine for one machine.

    from pie_local import Engine, SamplingParams
    async with Engine() as engine:
        print(await engine.run("text-completion", {"prompt": "Once upon a time"}))

The names below are imported on first use, so `import pie_local` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_RUNTIME_NAMES = (
    "Engine", "EngineConfig", "SamplingParams", "Context", "Forward", "Limits", "Param", "Runtime",
    "InferletHandle", "OutOfPagesError", "EngineStats", "Message", "Embedding", "brle",
)
_CONSTRAINT_NAMES = ("JsonSchema", "Regex", "Grammar", "AllOf", "Triggered")

__all__ = ["__version__", *_RUNTIME_NAMES, *_CONSTRAINT_NAMES, "Tool", "Client", "McpServer"]


def __getattr__(name: str) -> Any:
    if name in _RUNTIME_NAMES:
        import pie_local.runtime as runtime

        return getattr(runtime, name)
    if name in _CONSTRAINT_NAMES:
        from pie_local.runtime import constraints

        return getattr(constraints, name)
    if name == "Tool":
        from pie_local.runtime.tools import Tool

        return Tool
    if name == "Client":
        from pie_local.server.client import Client

        return Client
    if name == "McpServer":
        from pie_local.runtime.mcp import McpServer

        return McpServer
    raise AttributeError(f"module 'pie_local' has no attribute {name!r}")
