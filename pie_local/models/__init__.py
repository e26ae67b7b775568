"""Models: the catalogue (models.toml), the local store, pulling from the hub, GGUF metadata.

    from pie_local.models import resolve_model
    model = resolve_model("qwen2.5-0.5b")     # or None for the default, or a path to a .gguf

Submodules: registry (catalogue), store (installed models), pull (downloads), gguf_info
(metadata + memory estimate), gguf_check (refuses files that would crash llama.cpp or the driver),
starter (the model shipped on PyPI), spec (what users type), chat_template and tool_formats
(prompts and the tool calls of each model family).
"""

from pie_local.models.errors import (
    ChecksumError,
    CorruptGGUFError,
    DiskFullError,
    GGUFError,
    HubAuthError,
    HubNotFoundError,
    ModelError,
    ModelNotInstalledError,
    OfflineError,
    PullCancelled,
    PullError,
    QuantNotFoundError,
    RegistryError,
    UnknownModelError,
    UnsupportedArchitectureError,
)
from pie_local.models.resolve import ResolvedModel, resolve_model
from pie_local.models.store import STARTER_NAME, InstalledModel

__all__ = [
    "STARTER_NAME",
    "ChecksumError",
    "CorruptGGUFError",
    "DiskFullError",
    "GGUFError",
    "HubAuthError",
    "HubNotFoundError",
    "InstalledModel",
    "ModelError",
    "ModelNotInstalledError",
    "OfflineError",
    "PullCancelled",
    "PullError",
    "QuantNotFoundError",
    "RegistryError",
    "ResolvedModel",
    "UnknownModelError",
    "UnsupportedArchitectureError",
    "resolve_model",
]
