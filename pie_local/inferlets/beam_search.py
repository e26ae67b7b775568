"""Beam search over forked contexts: each step probes the top-k next tokens of every beam in one
batched pass, keeps the ``beam_width`` best continuations by total log-probability, and forks the
surviving beams (pages shared, so a beam costs only its own tail)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

from pie_local import Param
from pie_local.inferlets._common import prime

NAME = "beam-search"
DESCRIPTION = "Beam search: fork + top-k probes; returns the highest log-probability continuation."
PARAMETERS = {
    "prompt": Param(str, required=True, help="text to continue"),
    "beam_width": Param(int, default=3, help="beams kept after each step"),
    "max_tokens": Param(int, default=32, help="tokens per beam at most"),
    "length_penalty": Param(float, default=1.0, help="beams rank by logprob / length ** penalty at the end"),
}


@dataclass
class Beam:
    ctx: Any  # None once the beam finished (its last token was an end-of-generation token)
    next_input: int  # the beam's newest token, not yet in its KV
    tokens: list[int]  # generated so far
    logprob: float  # their total log-probability


async def main(rt, args):
    if args.beam_width < 1:
        raise ValueError(f"--beam-width must be >= 1, got {args.beam_width}")
    tok = rt.tokenizer
    eos = tok.eos_ids
    root = rt.context()
    beams = [Beam(root, prime(root, args.prompt), [], 0.0)]
    finished: list[Beam] = []
    forks = 0

    async def expand(beam: Beam):
        out = await beam.ctx.forward().input([beam.next_input]).probe(0, top_k=args.beam_width).execute()
        return beam, out.top_ids[0], out.top_probs[0]

    for _ in range(args.max_tokens):
        expanded = await asyncio.gather(*(expand(b) for b in beams))
        options = []  # (total logprob, parent beam, token)
        for beam, ids, probs in expanded:
            for token, p in zip(ids.tolist(), probs.tolist()):
                if p > 0:
                    options.append((beam.logprob + math.log(p), beam, int(token)))
        options.sort(key=lambda o: -o[0])
        survivors: list[Beam] = []
        for score, parent, token in options:
            if token in eos:
                if len(finished) < args.beam_width:
                    finished.append(Beam(None, token, list(parent.tokens), score))
            elif len(survivors) < args.beam_width:
                survivors.append(Beam(parent.ctx, token, parent.tokens + [token], score))
        # every survivor needs its own context: forks of its parent (the parent's KV now ends with
        # the parent's input token); the last survivor of a parent takes the parent itself
        taken: dict[int, int] = {}
        users = {id(b.ctx): sum(1 for s in survivors if s.ctx is b.ctx) for b in survivors}
        for s in survivors:
            key = id(s.ctx)
            taken[key] = taken.get(key, 0) + 1
            if taken[key] < users[key]:
                s.ctx = s.ctx.fork1()
                forks += 1
        for beam in beams:
            if id(beam.ctx) not in users:
                beam.ctx.release()
        beams = survivors
        if not beams or len(finished) >= args.beam_width:
            break

    def rank(b: Beam) -> float:
        return b.logprob / max(1, len(b.tokens)) ** args.length_penalty

    best = max(finished + beams, key=rank)
    text = tok.decode(best.tokens, special=False)
    rt.emit(text)
    return {"text": text, "token_ids": best.tokens, "logprob": best.logprob, "forks": forks,
            "beams": [{"text": tok.decode(b.tokens, special=False), "logprob": b.logprob,
                       "finished": b.ctx is None} for b in sorted(finished + beams, key=rank, reverse=True)]}
