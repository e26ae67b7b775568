"""Prompt-lookup speculative decoding, greedy. Drafts come from the text itself: find the latest
earlier occurrence of the last ``ngram`` tokens and propose the tokens that followed it. One
forward pass verifies a whole draft (the pending token + the draft, every row sampled greedily);
the longest prefix of the draft that agrees with the model is accepted, plus the model's own next
token, and the KV of rejected draft tokens is truncated away. The output is exactly greedy
decoding's, in fewer forward passes when the text repeats itself (code edits, summaries, RAG)."""

from __future__ import annotations

from pie_local import Param, SamplingParams
from pie_local.inferlets._common import prime

NAME = "prompt-lookup"
DESCRIPTION = "Greedy generation with prompt-lookup speculative decoding (drafts verified in one pass)."
PARAMETERS = {
    "prompt": Param(str, required=True, help="text to continue"),
    "max_tokens": Param(int, default=128, help="tokens to generate"),
    "ngram": Param(int, default=3, help="longest n-gram to match (tries ngram..1)"),
    "draft": Param(int, default=8, help="draft tokens proposed per pass at most"),
}


def find_draft(tokens: list[int], max_ngram: int, max_draft: int) -> list[int]:
    """Tokens that followed the latest earlier occurrence of the longest matching suffix n-gram."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + max_draft]
    return []


async def main(rt, args):
    if args.ngram < 1 or args.draft < 0:
        raise ValueError("--ngram must be >= 1 and --draft >= 0")
    tok = rt.tokenizer
    ctx = rt.context()
    next_input = prime(ctx, args.prompt)
    history = ctx.token_ids + [next_input]  # prompt + accepted output
    greedy = SamplingParams.greedy()
    out: list[int] = []
    passes = drafted = accepted = 0
    decoder = tok.stream_decoder()
    finished = False
    while len(out) < args.max_tokens and not finished:
        budget = args.max_tokens - len(out)
        draft = find_draft(history, args.ngram, min(args.draft, budget - 1))
        kv_before = len(ctx)
        rows = list(range(len(draft) + 1))
        res = await ctx.forward().input([next_input] + draft).sample(rows, greedy).execute()
        passes += 1
        drafted += len(draft)
        predicted = [int(t) for t in res.tokens]  # predicted[i]: the model's token after input i
        n_ok = 0
        while n_ok < len(draft) and predicted[n_ok] == draft[n_ok]:
            n_ok += 1
        accepted += n_ok
        ctx.truncate(kv_before + 1 + n_ok)  # drop the KV of rejected draft tokens
        for token in predicted[: n_ok + 1]:
            if token in tok.eos_ids:
                finished = True
                break
            out.append(token)
            history.append(token)
            rt.emit(decoder.push(token))
        next_input = out[-1] if out else next_input
    rt.emit(decoder.flush())
    return {"text": tok.decode(out, special=False), "token_ids": out, "forward_passes": passes,
            "drafted": drafted, "accepted": accepted}
