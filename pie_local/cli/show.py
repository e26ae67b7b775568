"""Show a model's GGUF metadata and the memory it needs for weights + KV cache at a context.

NAME is an installed name, the starter model, or a path to a .gguf file. The estimate is
weights plus K/V for every layer at --context tokens (default: the model's trained context);
compute buffers come on top.

examples:
  pie-local show gemma3-270m
  pie-local show qwen2.5-0.5b --context 8192
  pie-local show ./model.gguf --json --context 4096 --kv-type q8_0
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME|PATH.gguf")
    parser.add_argument("--context", type=int, help="context length for the KV estimate (default: the model's)")
    parser.add_argument("--kv-type", default="f16", choices=["f16", "q8_0", "f32"], help="KV cache type (default f16)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from pie_local.models import resolve_model
    from pie_local.present.format import human_count, human_size
    from pie_local.models.gguf_info import kv_cache_bytes, read_gguf_info
    from pie_local.present.problems import UsageError, UserError

    if args.context is not None and args.context <= 0:
        raise UsageError(f"--context must be a positive number of tokens, got {args.context}")
    model = resolve_model(args.name)
    info = read_gguf_info(model.path)
    context = args.context or info.context_length or model.context_length
    if not context:
        raise UserError(f"{model.path} has no context length", "pass --context N")
    kv = kv_cache_bytes(info, context, args.kv_type)
    memory = {"context": context, "kv_type": args.kv_type, "weights": info.weight_bytes, "kv_cache": kv}
    memory["total"] = info.weight_bytes + kv
    if args.json:
        data = {"name": model.name, **info.to_json(), "memory": memory}
        data["chat_template_override"] = model.chat_template is not None
        print(json.dumps(data, indent=2))
        return 0
    mix = ", ".join(f"{q.type} {q.bytes / max(info.weight_bytes, 1):.0%}" for q in info.quant_mix[:5])
    fields = [
        ("name", model.name),
        ("file", str(info.path) + (f" (+{len(info.files) - 1} parts)" if len(info.files) > 1 else "")),
        ("title", info.name or "-"),
        ("architecture", info.arch or "-"),
        ("parameters", f"{human_count(info.n_params)}" + (f" ({info.size_label})" if info.size_label else "")),
        ("quantization", f"{info.file_type or '-'}  [{mix}]"),
        ("layers", str(info.n_layers or "-")),
        ("context", f"{info.context_length or '-'}"),
        ("embedding", f"{info.embedding_length or '-'}"),
        ("heads", f"{info.n_heads or '-'} (kv {info.n_kv_heads or '-'}, head dim {info.key_length or '-'})"),
        ("sliding window", str(info.sliding_window) if info.sliding_window else "-"),
        ("vocab", f"{info.vocab_size or '-'} ({info.tokenizer_model or '?'})"),
        (
            "chat template",
            "yes" if info.has_chat_template else ("override in models.toml" if model.chat_template else "no"),
        ),
        ("license", info.license or "-"),
        ("file size", human_size(info.file_size)),
        (
            f"memory @ {context} tok",
            f"{human_size(memory['total'])} = weights {human_size(info.weight_bytes)}"
            f" + KV {human_size(kv)} ({args.kv_type})",
        ),
    ]
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key.ljust(width)}  {value}")
    return 0
