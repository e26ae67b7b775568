"""Best-of-n / self-consistency: fork the prompt's context n ways, sample every branch in the same
batches, then pick by majority vote over the extracted answers (ties: higher mean log-probability)
or by mean log-probability alone."""

from __future__ import annotations

import asyncio
import re
from collections import Counter

from pie_local import Param, SamplingParams
from pie_local.inferlets._common import cut_at_stop, decode, prime

NAME = "best-of-n"
DESCRIPTION = "Sample n completions from forks of one prompt; pick by majority vote or log-probability."
PARAMETERS = {
    "prompt": Param(str, required=True, help="text to continue"),
    "n": Param(int, default=4, help="number of branches"),
    "max_tokens": Param(int, default=64, help="tokens per branch at most"),
    "temperature": Param(float, default=0.8, help="sampling temperature of the branches"),
    "top_p": Param(float, default=0.95, help="nucleus sampling mass"),
    "seed": Param(int, default=0, help="branch i samples with seed + 1000 * i"),
    "select": Param(str, default="vote", choices=("vote", "logprob"), help="how to pick the winner"),
    "answer_regex": Param(str, default=None,
                          help="regex whose first match is a branch's answer for the vote (default: first line)"),
    "stop": Param(list, default=None, help="stop strings, as JSON"),
}


def extract_answer(text: str, pattern: str | None) -> str:
    if pattern:
        match = re.search(pattern, text)
        return match.group(0).strip() if match else ""
    return text.strip().split("\n", 1)[0].strip()


async def main(rt, args):
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    stops = list(args.stop or [])
    tok = rt.tokenizer
    ctx = rt.context()
    first = prime(ctx, args.prompt)
    await ctx.flush()  # the shared prompt is computed once; every fork shares its pages
    branches = ctx.fork(args.n) if args.n > 1 else [ctx]

    async def run_branch(i: int, branch):
        sampling = SamplingParams(args.temperature, top_p=args.top_p, seed=args.seed + 1000 * i)
        sampled = await decode(branch, first, sampling, args.max_tokens, tuple(tok.eos_ids), stops)
        text = cut_at_stop(tok.decode(sampled.token_ids, special=False), stops)
        return {"branch": i, "text": text, "answer": extract_answer(text, args.answer_regex),
                "tokens": len(sampled.token_ids), "logprob": sampled.logprob, "mean_logprob": sampled.mean_logprob,
                "finish_reason": sampled.finish_reason}

    candidates = await asyncio.gather(*(run_branch(i, b) for i, b in enumerate(branches)))
    votes = Counter(c["answer"] for c in candidates)
    if args.select == "vote":
        best = max(candidates, key=lambda c: (votes[c["answer"]], c["mean_logprob"]))
    else:
        best = max(candidates, key=lambda c: c["mean_logprob"])
    rt.emit(best["text"])
    return {"text": best["text"], "answer": best["answer"], "votes": dict(votes), "winner": best["branch"],
            "candidates": candidates}
