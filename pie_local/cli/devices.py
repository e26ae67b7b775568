"""The device options every command that loads a model shares (--gpu-layers, --rpc,
--tensor-split), and the placement table `show`, `doctor` and `run --verbose` print."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


def gpu_layers(text: str) -> int:
    """``auto`` (or -1): as many layers as fit; otherwise a count >= 0."""
    if text.strip().lower() == "auto":
        return -1
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of layers, got {text!r}") from None
    if n < -1:
        raise argparse.ArgumentTypeError(f"must be 'auto' (or -1) or a number of layers >= 0, got {n}")
    return n


def endpoints(text: str) -> tuple[str, ...]:
    """``HOST:PORT[,HOST:PORT...]`` -> the endpoints, each checked for a host and a port."""
    out = []
    for entry in (e.strip() for e in text.split(",")):
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port in 1..65535, got {entry!r}")
        out.append(entry)
    return tuple(out)


def shares(text: str) -> tuple[float, ...]:
    """``3,1`` -> (3.0, 1.0): each offload device's share of the offloaded layers."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(not v >= 0 or v == float("inf") for v in values) or not any(values):
        raise argparse.ArgumentTypeError(f"shares must be finite, >= 0 and not all 0, got {text!r}")
    return values


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("devices")
    group.add_argument("--gpu-layers", "-ngl", type=gpu_layers, default=-1, metavar="N|auto",
                       help="layers on the GPUs and RPC workers, counted from the last; one more than the model's "
                            "layers puts the output head there too; 0 = CPU only (default auto: as many as fit)")
    group.add_argument("--rpc", type=endpoints, default=(), metavar="HOST:PORT[,...]",
                       help="RPC workers (`pie-local worker` on other machines) whose devices take layers")
    group.add_argument("--tensor-split", type=shares, default=(), metavar="A,B,...",
                       help="shares of the offloaded layers per offload device, in `show`'s order "
                            "(default: by free memory)")


def device_params(args: argparse.Namespace) -> dict[str, Any]:
    """The DriverParams fields the device options set."""
    return {"n_gpu_layers": args.gpu_layers, "rpc": tuple(args.rpc), "tensor_split": tuple(args.tensor_split)}


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def placement_rows(devices: Sequence[Any]) -> list[dict[str, Any]]:
    """One JSON-ready row per device (a ``DeviceUse``)."""
    return [
        {"device": d.name, "description": d.description,
         "layers": f"{d.layers.start}-{d.layers.stop - 1}" if len(d.layers) else "",
         "input": d.input, "output": d.output, "weight_bytes": d.weight_bytes, "kv_bytes": d.kv_bytes,
         "compute_bytes": d.compute_bytes, "free_bytes": d.free_bytes, "total_bytes": d.total_bytes}
        for d in devices
    ]


def placement_lines(devices: Sequence[Any]) -> list[str]:
    """A table: each device, its layers, and the memory it holds and has."""
    lines = []
    for d in devices:
        parts = []
        if len(d.layers):
            parts.append(f"layers {d.layers.start}-{d.layers.stop - 1}")
        if d.input:
            parts.append("embeddings")
        if d.output:
            parts.append("output head")
        held = ", ".join(parts) or "nothing"
        memory = f"weights {_mib(d.weight_bytes)}, KV {_mib(d.kv_bytes)}"
        if d.compute_bytes:
            memory += f", compute {_mib(d.compute_bytes)}"
        free = f"{_mib(d.free_bytes)} free of {_mib(d.total_bytes)}" if d.total_bytes else "memory unknown"
        lines.append(f"{d.name:<24} {held:<37} {memory}  ({free})")
    return lines
