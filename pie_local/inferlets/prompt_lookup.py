"""Prompt-lookup speculative decoding: the n-gram drafter. Drafts come from the text itself: find
the latest earlier occurrence of the last ``ngram`` tokens and propose the tokens that followed
it. generate(speculator=NgramDrafter(...)) verifies a whole draft in one forward pass (the pending
token + the draft, a sampled row at each): greedy output is exactly greedy decoding's, sampled
output keeps sampling's distribution; fewer passes when the text repeats itself (code edits,
quotes, summaries, RAG)."""

from __future__ import annotations

from pie_local import Param, SamplingParams
from pie_local.runtime.speculation import NgramDrafter, find_draft

__all__ = ["find_draft", "main"]

NAME = "prompt-lookup"
DESCRIPTION = "Generation with prompt-lookup speculative decoding (n-gram drafts verified in one pass)."
PARAMETERS = {
    "prompt": Param(str, required=True, help="text to continue"),
    "max_tokens": Param(int, default=128, help="tokens to generate"),
    "ngram": Param(int, default=3, help="longest n-gram to match (tries ngram..1)"),
    "draft": Param(int, default=8, help="draft tokens proposed per pass at most"),
    "temperature": Param(float, default=0.0, help="0 = greedy"),
    "seed": Param(int, default=None, help="seed for reproducible sampling"),
}


async def main(rt, args):
    if args.ngram < 1 or args.draft < 1:
        raise ValueError("--ngram and --draft must be >= 1")
    async with rt.context() as ctx:
        ctx.fill(args.prompt)
        sampling = SamplingParams(temperature=args.temperature, seed=args.seed)
        async for piece in ctx.stream(sampling, max_tokens=args.max_tokens, speculator=NgramDrafter(args.ngram),
                                      draft_tokens=args.draft):
            rt.emit(piece)
        last = ctx.last
    return {"text": last.text, "token_ids": last.token_ids, "forward_passes": last.forward_passes,
            "drafted": last.drafted_tokens, "accepted": last.accepted_tokens}
