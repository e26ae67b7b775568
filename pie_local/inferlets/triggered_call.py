"""A grammar on a trigger: the model writes free text, and once it writes the call tag the call
that follows must be valid JSON for the calculator tool (Triggered(tag, JsonSchema)). Nothing is
constrained before the tag, so the model may reason in prose first or never call at all; what the
call's schema forces (its keys) is fast-forwarded. The call is then run."""

from __future__ import annotations

import json

from pie_local import JsonSchema, Param, SamplingParams, Tool, Triggered
from pie_local.inferlets.react_agent import calculator
from pie_local.runtime.tools import tool_call_schema

NAME = "triggered-call"
DESCRIPTION = "Free text until the model writes a call tag; the call after it is constrained to the tool's schema."
PARAMETERS = {
    "prompt": Param(str, required=True, help="a question, e.g. 'What is 17 * 23?'"),
    "tag": Param(str, default="<tool_call>", help="the text that starts a call"),
    "max_tokens": Param(int, default=96, help="tokens at most"),
    "temperature": Param(float, default=0.0, help="0 = greedy"),
    "seed": Param(int, default=None, help="seed for reproducible sampling"),
}


def few_shot(tag: str, question: str) -> str:
    call = json.dumps({"name": "calculator", "arguments": {"expression": "3 + 4"}}, separators=(",", ":"))
    return (f"Questions answered with a calculator.\n"
            f"Q: What is 3 + 4?\nA: I will use the calculator. {tag}{call}\n"
            f"Q: {question}\nA:")


async def main(rt, args):
    tool = Tool.from_function(calculator)
    constraint = Triggered(args.tag, JsonSchema(tool_call_schema([tool])))
    async with rt.context() as ctx:
        ctx.fill(few_shot(args.tag, args.prompt))
        text = await ctx.generate(SamplingParams(temperature=args.temperature, seed=args.seed),
                                  max_tokens=args.max_tokens, constrain=constraint)
    prose, tag, call_text = text.partition(args.tag)
    rt.emit(text)
    if not tag:
        return {"text": prose, "call": None, "result": None, "finish_reason": text.finish_reason}
    if text.finish_reason != "stop":
        raise ValueError(f"the call was cut off after {args.max_tokens} tokens: {call_text!r}")
    call = json.loads(call_text)  # the constraint guarantees it parses
    try:
        result = calculator(**call["arguments"])
    except ValueError as exc:
        result = f"Error: {exc}"
    return {"text": prose, "call": call, "result": result, "finish_reason": text.finish_reason,
            "forced_tokens": text.forced_tokens}
