"""The inferlet runtime: engine, scheduler, KV pages, contexts, messaging.

Names are imported lazily so `import pie_local.runtime` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Engine": "engine", "EngineConfig": "engine", "InferletHandle": "handle", "Runtime": "runtime",
    "InferletCancelled": "handle", "ModelIdentity": "engine",
    "Context": "context", "Generation": "generation", "GenerationResult": "generation",
    "Forward": "forward", "ForwardOutput": "forward", "brle": "forward", "brle_decode": "forward",
    "SamplingParams": "sampling", "Embedding": "embedding", "Score": "scoring", "Selection": "scoring", "Reasoning": "reasoning",
    "NgramDrafter": "speculation", "ModelDrafter": "speculation", "GuessDrafter": "speculation", "Draft": "speculation",
    "OutOfPagesError": "pages",
    "Limits": "limits", "LimitExceeded": "limits", "PageLimitError": "limits", "TokenLimitError": "limits",
    "WallTimeExceeded": "limits", "ContextBusyError": "limits", "ContextLengthError": "limits",
    "Message": "messaging", "Subscription": "messaging",
    "Param": "inferlet", "InferletError": "inferlet", "InferletSpec": "inferlet", "load_inferlet": "inferlet",
    "EngineStats": "stats", "InferletStats": "stats",
    "SnapshotError": "snapshots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pie_local.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pie_local.runtime.{module}"), name)
