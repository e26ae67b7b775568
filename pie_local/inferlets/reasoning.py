"""A token budget for reasoning: the model reasons inside <think> ... </think> for at most
--budget tokens; if it has not closed the block by then, the closing tag is forced into the KV and
the answer is generated after it. Returns the reasoning and the answer apart. --answer-schema
constrains the answer (and only the answer) with a grammar triggered by the closing tag."""

from __future__ import annotations

import json

from pie_local import JsonSchema, Param, SamplingParams, Triggered
from pie_local.runtime import Reasoning

NAME = "reasoning"
DESCRIPTION = "Reason for at most --budget tokens, then close the block and answer; reasoning returned apart."
PARAMETERS = {
    "prompt": Param(str, required=True, help="the question (raw text)"),
    "budget": Param(int, default=128, help="tokens of reasoning at most"),
    "max_tokens": Param(int, default=256, help="tokens at most, reasoning and answer together"),
    "open_block": Param(bool, default=True, help="start the output inside the block (the prompt opens it)"),
    "open_tag": Param(str, default="<think>", help="the reasoning block's opening tag"),
    "close_tag": Param(str, default="</think>", help="its closing tag"),
    "answer_schema": Param(str, default=None, help="JSON schema the answer must follow (JSON text)"),
    "temperature": Param(float, default=0.0, help="0 = greedy"),
    "seed": Param(int, default=None, help="seed for reproducible sampling"),
}


async def main(rt, args):
    reasoning = Reasoning(args.budget, args.open_tag, args.close_tag)
    constraint = None
    if args.answer_schema:
        constraint = Triggered(args.close_tag, JsonSchema(json.loads(args.answer_schema)))
    async with rt.context() as ctx:
        ctx.fill(args.prompt + (f"\n{args.open_tag}\n" if args.open_block else ""))
        sampling = SamplingParams(temperature=args.temperature, seed=args.seed)
        async for piece in ctx.stream(sampling, max_tokens=args.max_tokens, constrain=constraint,
                                      reasoning=reasoning):
            rt.emit(piece)
        last = ctx.last
    return {"reasoning": last.reasoning, "answer": last.text, "reasoning_tokens": last.reasoning_tokens,
            "finish_reason": last.finish_reason}
