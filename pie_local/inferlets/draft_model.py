"""Speculative decoding with a draft model: a second, smaller model (loaded in its own Engine in
this process, sharing the target's vocabulary) drafts --draft tokens greedily; the target verifies
them in one forward pass (generate(speculator=ModelDrafter(...))). Greedy output is the target's
greedy output; sampled output keeps the target's distribution. Without --draft-model the target
model drafts for itself: every draft is accepted, which shows the mechanics, not a speedup (a
draft pass costs as much as a target pass)."""

from __future__ import annotations

import time

from pie_local import Param, SamplingParams
from pie_local.runtime import Engine, EngineConfig, ModelDrafter

NAME = "draft-model"
DESCRIPTION = "Speculative decoding: a second, smaller model drafts, the target verifies each draft in one pass."
PARAMETERS = {
    "prompt": Param(str, required=True, help="text to continue"),
    "draft_model": Param(str, default=None, help="the drafting model: a name or .gguf path (default: the target)"),
    "max_tokens": Param(int, default=64, help="tokens to generate"),
    "draft": Param(int, default=4, help="tokens drafted per verification pass"),
    "temperature": Param(float, default=0.0, help="0 = greedy"),
    "seed": Param(int, default=None, help="seed for reproducible sampling"),
}


async def main(rt, args):
    target = rt.engine
    draft_model = args.draft_model or target.model_path
    if draft_model is None:
        raise ValueError("--draft-model is needed: the target engine was not loaded from a model file")
    config = EngineConfig(driver=target.config.driver)  # the target's threads, device and KV settings
    async with Engine(draft_model, config) as draft_engine:
        if draft_engine.info.n_vocab != target.info.n_vocab:
            raise ValueError(f"the draft model's vocabulary ({draft_engine.info.n_vocab} tokens) is not the "
                             f"target's ({target.info.n_vocab})")
        drafter = ModelDrafter(draft_engine)
        async with rt.context() as ctx:
            ctx.fill(args.prompt)
            sampling = SamplingParams(temperature=args.temperature, seed=args.seed)
            started = time.perf_counter()
            async for piece in ctx.stream(sampling, max_tokens=args.max_tokens, speculator=drafter,
                                          draft_tokens=args.draft):
                rt.emit(piece)
            elapsed = time.perf_counter() - started
            last = ctx.last
        drafter.release()
    return {"text": last.text, "token_ids": last.token_ids, "forward_passes": last.forward_passes,
            "drafted": last.drafted_tokens, "accepted": last.accepted_tokens,
            "tokens_per_s": len(last.token_ids) / elapsed if elapsed > 0 else 0.0}
