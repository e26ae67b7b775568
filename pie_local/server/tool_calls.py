"""Tools in OpenAI requests: forcing a call (tool_choice "required" or a named tool) through an
llguidance constraint over the model family's tool-call format, and finding calls in the output.

With tool_choice "auto" the model may answer in text or with a call; `CallSniffer` streams text
at once but holds back output that starts like a call (``{``, ``[``, ``<tool_call>``,
``[TOOL_CALLS]``, ``<|tool_call|>``, a harmony ``<|channel|>``...) until the generation ends, when it
is parsed into ``tool_calls`` (or released as text after all).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from pie_local.models.tool_formats import CALL_STARTS, ToolCall, parse_tool_calls
from pie_local.server.schema import ToolSpec


def _never_called(**_: Any) -> None:
    raise RuntimeError("the server returns tool calls to the client; it never runs them")


def forced_call_constraint(tools: Sequence[ToolSpec], choice: str, tool_format: str) -> Any:
    """The constraint under which the model can only write one call (to ``choice`` when it names a tool)."""
    from pie_local.runtime.tools import Tool, tool_call_constraint

    chosen = [t for t in tools if choice == "required" or t.name == choice]
    return tool_call_constraint([Tool(t.name, t.description, _closed(t.parameters), _never_called) for t in chosen],
                                tool_format)


def _closed(parameters: dict) -> dict:
    """Arguments hold the declared properties only, unless the schema says otherwise: JSON schema
    allows any extra key by default, and a constrained small model fills that freedom with junk."""
    if parameters.get("type") == "object" and "properties" in parameters and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def extract_calls(text: str, tools: Sequence[ToolSpec], tool_format: str | None = None) -> list[ToolCall]:
    """The calls in ``text`` to tools the request offered (anything else is not a call)."""
    names = {t.name for t in tools}
    return [c for c in parse_tool_calls(text, tool_format) if c.name in names]


def call_json(call: ToolCall, index: int | None = None) -> dict:
    """An OpenAI ``tool_calls`` entry: arguments as a JSON string, as OpenAI sends them."""
    entry = {"id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
    return entry if index is None else {"index": index, **entry}


class CallSniffer:
    """Decides from the first visible characters whether streamed output is text or a tool call."""

    def __init__(self, forced: bool = False) -> None:
        self.state = "call" if forced else "undecided"  # -> "text" or "call"
        self.held = ""

    def push(self, text: str) -> str:
        """The text to stream now ("" while undecided or inside a call)."""
        if self.state == "text":
            return text
        self.held += text
        if self.state == "call":
            return ""
        head = self.held.lstrip()
        if not head:
            return ""
        if head.startswith(CALL_STARTS):
            self.state = "call"
            return ""
        if any(marker.startswith(head) for marker in CALL_STARTS):
            return ""  # "<tool" may still become "<tool_call>"
        self.state, out, self.held = "text", self.held, ""
        return out
