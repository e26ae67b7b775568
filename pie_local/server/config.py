"""The server's settings (what `pie-local serve` parses) and the size/duration notations it accepts."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

DEFAULT_PORT = 8471


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None
    keep_alive_s: float | None = 600.0  # idle seconds before a model unloads; None = never
    max_models: int = 1  # models resident at once
    models: list[str] = field(default_factory=list)  # loaded at start
    threads: int = 0  # per engine; <= 0: auto (the driver picks and adapts the count)
    n_pages: int = 512  # KV pages per model
    page_size: int = 32
    n_gpu_layers: int = -1  # per engine: layers on GPUs / RPC workers; -1 = as many as fit
    rpc: tuple[str, ...] = ()  # RPC workers (host:port) whose devices take layers
    tensor_split: tuple[float, ...] = ()  # shares of the offloaded layers per offload device
    max_body_bytes: int = 8 << 20
    max_connections: int = 64
    max_n: int = 16  # largest `n` a request may ask for
    inferlet_files: bool = True  # local clients may run their own inferlet files

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str) -> float | None:
    """"10m", "30s", "1h", "0" (unload at once) -> seconds; "-1", "never", "forever" -> None (never)."""
    if text.strip().lower() in ("never", "forever", "inf"):
        return None
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (e.g. 30s, 10m, 1h, 0, never)")
    seconds = float(match.group(1)) * _UNITS_S[match.group(2)]
    return None if seconds < 0 else seconds


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?i?b?)?\s*$", re.I)


def parse_size(text: str) -> int:
    """"8MiB", "512k", "1048576" -> bytes (k/m/g are powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 8MiB, 512k)")
    unit = (match.group(2) or "").lower()[:1]
    return int(float(match.group(1)) * {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit])
