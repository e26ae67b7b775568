"""Tree of thought, breadth-first: every frontier node forks into ``breadth`` children, each child
samples one thought (a line), children are scored by the mean log-probability of their thought,
and the best ``keep`` go on to the next level. All children of a level decode in the same batches
and share their ancestors' KV pages."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pie_local import Param, SamplingParams
from pie_local.inferlets._common import decode, prime

NAME = "tree-of-thought"
DESCRIPTION = "Tree of thought: fork depth x breadth, one thought per node, keep the best by log-probability."
PARAMETERS = {
    "prompt": Param(str, required=True, help="the problem, ending where the first thought starts"),
    "depth": Param(int, default=2, help="levels of thoughts"),
    "breadth": Param(int, default=3, help="children per node"),
    "keep": Param(int, default=None, help="nodes kept per level (default: breadth)"),
    "thought_tokens": Param(int, default=32, help="tokens per thought at most"),
    "temperature": Param(float, default=0.8, help="sampling temperature of thoughts"),
    "top_p": Param(float, default=0.95, help="nucleus sampling mass"),
    "seed": Param(int, default=0, help="base seed; each node derives its own"),
}


@dataclass
class Node:
    ctx: object
    next_input: int
    thoughts: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    @property
    def score(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else 0.0


async def main(rt, args):
    keep = args.keep or args.breadth
    if args.depth < 1 or args.breadth < 1 or keep < 1:
        raise ValueError("--depth, --breadth and --keep must be >= 1")
    tok = rt.tokenizer
    root_ctx = rt.context()
    frontier = [Node(root_ctx, prime(root_ctx, args.prompt))]
    tree: list[dict] = []
    nodes_expanded = 0

    async def grow(parent: Node, child_ctx, seed: int) -> Node:
        sampling = SamplingParams(args.temperature, top_p=args.top_p, seed=seed)
        sampled = await decode(child_ctx, parent.next_input, sampling, args.thought_tokens,
                               tuple(tok.eos_ids), ("\n",))
        thought = tok.decode(sampled.token_ids, special=False).split("\n", 1)[0].strip()
        return Node(child_ctx, sampled.next_input, parent.thoughts + [thought], parent.scores + [sampled.mean_logprob])

    for level in range(args.depth):
        jobs = []
        for p, parent in enumerate(frontier):
            children = parent.ctx.fork(args.breadth)
            for c, child in enumerate(children):
                jobs.append(grow(parent, child, args.seed + 7919 * level + 101 * p + c))
        grown = await asyncio.gather(*jobs)
        nodes_expanded += len(grown)
        for parent in frontier:
            parent.ctx.release()
        grown.sort(key=lambda n: n.score, reverse=True)
        for n in grown:
            tree.append({"level": level + 1, "thoughts": n.thoughts, "score": n.score})
        for n in grown[keep:]:
            n.ctx.release()
        frontier = grown[:keep]

    best = frontier[0]
    text = "\n".join(best.thoughts)
    rt.emit(text)
    return {"text": text, "thoughts": best.thoughts, "score": best.score, "nodes": nodes_expanded, "tree": tree}
