"""Generation with tools: the model writes a call in its chat template's tool format, the runtime
runs the tool and appends the result as a "tool" message to the same KV (no re-prefill), and the
model continues, until it answers without a call or ``max_tool_calls`` rounds were used."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

if TYPE_CHECKING:
    from pie_local.runtime.context import Context


async def run_with_tools(ctx: Context, sampling: Any, max_tokens: int, stop: Sequence[str] | None,
                         constrain: Any, tools: Sequence[Any], max_tool_calls: int) -> AsyncIterator[str]:
    from pie_local.runtime.tools import as_tools, call_tool

    tools = as_tools(tools)
    if not ctx._messages:
        raise ValueError("generate(tools=...) needs a chat context: add messages with ctx.system()/ctx.user() first")
    ctx.set_tools([t.schema for t in tools])
    template = ctx._engine.chat_template
    calls_made: list[Any] = []
    for round_ in range(max_tool_calls + 1):
        async with contextlib.aclosing(ctx._stream_once(sampling, max_tokens, stop, constrain)) as pieces:
            async for piece in pieces:
                yield piece
        gen = ctx.last
        calls = template.parse_tool_calls(gen.text) if round_ < max_tool_calls else []
        if not calls:
            break
        calls_made += calls
        # the reply was a call: record it as such, then answer each call with a tool message
        ctx._messages[-1] = {"role": "assistant", "content": gen.text, "tool_calls": [c.to_message() for c in calls]}
        ctx._rendered = ctx._render(ctx._messages)
        for call in calls:
            result = await call_tool(tools, call)
            ctx._add_message(result.to_message(call))
    ctx.last.tool_calls = calls_made
