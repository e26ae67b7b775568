"""Classification by likelihood: score every label as a continuation of the prompt (forks of one
prefix, scored in one batch by teacher forcing) and pick the most probable, per token or in
total. No sampling, so the answer is always one of the labels."""

from __future__ import annotations

from pie_local import Param

NAME = "classify"
DESCRIPTION = "Pick the most likely of several labels as the continuation of a prompt (ctx.select)."
PARAMETERS = {
    "prompt": Param(str, required=True, help="text the label follows, e.g. 'Review: great film!\\nSentiment:'"),
    "labels": Param(list, required=True, help='candidate continuations, as JSON: [" positive", " negative"]'),
    "normalize": Param(bool, default=True, help="rank by mean log-probability per token (else by total)"),
}


async def main(rt, args):
    labels = [str(label) for label in args.labels]
    if not labels:
        raise ValueError("--labels needs at least one label")
    async with rt.context() as ctx:
        ctx.fill(args.prompt)
        chosen = await ctx.select(labels, normalize=args.normalize)
    rt.emit(chosen.option)
    return {"label": chosen.option, "index": chosen.index,
            "scores": [{"label": label, "logprob": s.total, "mean_logprob": s.mean, "tokens": len(s.token_ids)}
                       for label, s in zip(labels, chosen.scores)]}
