"""Attention sinks (StreamingLLM): generate with every new token attending only to the first
``sink`` tokens plus the last ``window`` tokens, through per-token BRLE masks; KV pages that no
future token can see are dropped from the context, so memory stays bounded however long it runs.
Masked and dropped KV are the same to the model: dropping changes memory, not the output."""

from __future__ import annotations

from pie_local import Param, SamplingParams, brle
from pie_local.inferlets._common import prime, step_sampling

NAME = "attention-sink"
DESCRIPTION = "Generate with attention to the first --sink tokens + a --window of recent ones; drops old pages."
PARAMETERS = {
    "prompt": Param(str, required=True, help="text to continue"),
    "max_tokens": Param(int, default=256, help="tokens to generate"),
    "sink": Param(int, default=4, help="leading tokens every token keeps attending to"),
    "window": Param(int, default=128, help="recent tokens every token attends to"),
    "drop_pages": Param(bool, default=True, help="free KV pages that left the window (else only mask them)"),
    "temperature": Param(float, default=0.0, help="0 = greedy"),
    "seed": Param(int, default=None, help="seed for reproducible sampling"),
}


def visible_mask(kv_positions: list[int], sink: int, window: int) -> list[int]:
    """BRLE over the KV (in order, by original position) for the newest token, at kv_positions[-1]."""
    newest = kv_positions[-1]
    return brle([p < sink or p > newest - window for p in kv_positions])


def droppable_pages(kv_positions: list[int], page_size: int, sink: int, window: int, next_position: int) -> list[int]:
    """Indices of full pages whose tokens no token from ``next_position`` on can see."""
    n_full = len(kv_positions) // page_size
    out = []
    for i in range(n_full):
        page = kv_positions[i * page_size : (i + 1) * page_size]
        if all(p >= sink and p <= next_position - window for p in page):
            out.append(i)
    return out


async def generate_masked(rt, args, sink: int, window: int) -> dict:
    if window < 1 or sink < 0:
        raise ValueError("--window must be >= 1 and --sink >= 0")
    tok = rt.tokenizer
    ctx = rt.context()
    ctx.max_position = None  # the masks keep attention inside the window: positions may pass the trained context
    next_input = prime(ctx, args.prompt)
    await ctx.flush()  # the prompt is prefilled with plain causal attention
    sampling = SamplingParams(temperature=args.temperature, seed=args.seed)
    page_size = ctx.engine_info.page_size
    kv_positions = list(range(ctx.kv_len))  # position of each KV entry, in KV order (prompt: causal)
    generated: list[int] = []
    masked_steps, pages_dropped, max_pages = 0, 0, ctx.n_pages
    decoder = tok.stream_decoder()
    for step in range(args.max_tokens):
        position = kv_positions[-1] + 1 if kv_positions else 0
        kv_positions.append(position)  # the KV after this pass
        mask = visible_mask(kv_positions, sink, window)
        masked_steps += int(len(mask) > 2 or mask[0] > 0)
        fwd = ctx.forward().input([next_input], positions=[position], masks=[mask])
        out = await fwd.sample(0, step_sampling(sampling, step)).execute()
        token = int(out.tokens[0])
        max_pages = max(max_pages, ctx.n_pages)
        if args.drop_pages:
            drop = droppable_pages(kv_positions, page_size, sink, window, position + 1)
            if drop:
                ctx.drop_pages(drop)
                gone = {i * page_size + j for i in drop for j in range(page_size)}
                kv_positions = [p for k, p in enumerate(kv_positions) if k not in gone]
                pages_dropped += len(drop)
        if token in tok.eos_ids:
            break
        generated.append(token)
        rt.emit(decoder.push(token))
        next_input = token
    rt.emit(decoder.flush())
    return {"text": tok.decode(generated, special=False), "token_ids": generated, "masked_steps": masked_steps,
            "pages_dropped": pages_dropped, "max_pages": max_pages, "kv_tokens": ctx.kv_len}


async def main(rt, args):
    return await generate_masked(rt, args, args.sink, args.window)
