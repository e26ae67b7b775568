"""Sliding-window attention on any model: each new token attends to the last ``window`` tokens
only (a BRLE mask per token), and KV pages that slid out of the window are dropped."""

from __future__ import annotations

from pie_local import Param
from pie_local.inferlets.attention_sink import generate_masked

NAME = "windowed-attention"
DESCRIPTION = "Generate with attention to the last --window tokens only; drops pages that slid out."
PARAMETERS = {
    "prompt": Param(str, required=True, help="text to continue"),
    "max_tokens": Param(int, default=256, help="tokens to generate"),
    "window": Param(int, default=128, help="recent tokens every token attends to"),
    "drop_pages": Param(bool, default=True, help="free KV pages that left the window (else only mask them)"),
    "temperature": Param(float, default=0.0, help="0 = greedy"),
    "seed": Param(int, default=None, help="seed for reproducible sampling"),
}


async def main(rt, args):
    return await generate_masked(rt, args, sink=0, window=args.window)
