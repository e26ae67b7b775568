"""A model's card: the labelled fields `pie-local show` prints and the TUI's models screen shows.

The card is built once, from the model's GGUF header and what the store knows about it, and both
front ends render it as it is, so they always show the same fields under the same labels. The
fields that say whether a model fits come first: the TUI's details pane shows only the top lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pie_local.models.gguf_info import kv_cache_bytes
from pie_local.present.format import UNKNOWN, human_count, human_size, label_lines
from pie_local.present.problems import UserError

if TYPE_CHECKING:
    from pie_local.models.gguf_info import GGUFInfo
    from pie_local.models.resolve import ResolvedModel


@dataclass(frozen=True)
class ModelCard:
    name: str
    fields: tuple[tuple[str, str], ...]  # (label, value) in display order
    data: dict[str, Any] = field(default_factory=dict)  # the same facts, machine-readable (`show --json`)

    def text(self) -> str:
        return label_lines(self.fields)


def read_model_card(name: str | None, context: int | None = None, kv_type: str = "f16") -> ModelCard:
    """The card of an installed name, a catalogue name or a .gguf path (None: the default model),
    with the memory it needs at ``context`` tokens (default: the model's trained context)."""
    from pie_local.models import resolve_model
    from pie_local.models.gguf_info import read_gguf_info

    model = resolve_model(name)
    info = read_gguf_info(model.path)
    context = context or info.context_length or model.context_length
    if not context:
        raise UserError(f"{model.path} has no context length", "pass --context N")
    return model_card(model, info, context, kv_type)


def model_card(model: ResolvedModel, info: GGUFInfo, context: int, kv_type: str = "f16") -> ModelCard:
    kv = kv_cache_bytes(info, context, kv_type)
    memory = {"context": context, "kv_type": kv_type, "weights": info.weight_bytes, "kv_cache": kv,
              "total": info.weight_bytes + kv}
    mix = ", ".join(f"{q.type} {q.bytes / max(info.weight_bytes, 1):.0%}" for q in info.quant_mix[:5])
    if model.chat_template:  # the order the engine picks a template in
        template = "override in models.toml"
    else:
        template = "from the GGUF" if info.has_chat_template else "built-in fallback"
    parts = f" (+{len(info.files) - 1} parts)" if len(info.files) > 1 else ""
    fields = (
        ("name", model.name),
        ("title", _known(info.name)),
        ("architecture", _architecture(info.arch)),
        ("parameters", human_count(info.n_params) + (f" ({info.size_label})" if info.size_label else "")),
        ("quantization", f"{_known(info.file_type)}  [{mix}]"),
        ("file size", human_size(info.file_size)),
        (f"memory @ {context} tok", f"{human_size(memory['total'])} = weights {human_size(info.weight_bytes)}"
                                    f" + KV {human_size(kv)} ({kv_type})"),
        ("context", _known(info.context_length)),
        ("layers", _known(info.n_layers)),
        ("embedding", _known(info.embedding_length)),
        ("heads", f"{_known(info.n_heads)} (kv {_known(info.n_kv_heads)}, head dim {_known(info.key_length)})"),
        ("sliding window", _known(info.sliding_window)),
        ("vocab", _known(info.vocab_size) + (f" ({info.tokenizer_model})" if info.tokenizer_model else "")),
        ("chat template", template),
        ("license", _known(info.license)),
        ("file", f"{info.path}{parts}"),
    )
    data = {"name": model.name, **info.to_json(), "memory": memory,
            "chat_template_override": model.chat_template is not None}
    return ModelCard(model.name, fields, data)


def _known(value: object) -> str:
    return str(value) if value else UNKNOWN


def _architecture(arch: str | None) -> str:
    """The architecture, and whether this pie-local runs it (the list when it does not)."""
    from pie_local.models.gguf_check import supported_architectures

    supported = supported_architectures()
    if not arch or supported is None or arch in supported:
        return _known(arch)
    return f"{arch} (not supported; supported: {', '.join(supported)})"

