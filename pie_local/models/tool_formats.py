"""Tool-call formats: how each model family writes a function call, found from its chat template.

    fmt = detect_tool_format(template_source)      # "hermes", "mistral", "harmony", ...
    calls = parse_tool_calls(generated_text, fmt)    # -> [ToolCall(...)]; malformed text -> []

The formats, as the families' own chat templates write a call:

    json          {"name": "f", "arguments": {...}}                         (no format of its own)
    llama3        {"name": "f", "parameters": {...}}, maybe after <|python_tag|>
    hermes        <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>    Qwen2.5/3, SmolLM3, Granite 4
    mistral       [TOOL_CALLS]f[ARGS]{...}                                  Mistral Small 3.2, Ministral 3, Devstral
    mistral-json  [TOOL_CALLS][{"name": "f", "arguments": {...}}]            Mistral 7B v0.3, Nemo
    phi4          <|tool_call|>[{"name": "f", "arguments": {...}}]<|/tool_call|>   Phi-4-mini
    granite       <|tool_call|>[{"name": "f", "arguments": {...}}]          Granite 3.x
    harmony       <|channel|>commentary to=functions.f <|constrain|>json<|message|>{...}   gpt-oss

Most markers are control tokens of their vocabularies, which generated text leaves out; the
format's `markers` are the ones the engine keeps in the text (like llama.cpp's preserved tokens)
so a call can be told from prose. The parser reads every format whatever the template says, so a
model that answers in another family's style is still understood.
"""

from __future__ import annotations

import json
import re
import secrets
import string
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    """One function call the model asked for."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:12]}")

    def to_message(self) -> dict[str, Any]:
        """The OpenAI-style entry of an assistant message's `tool_calls` list."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolFormat:
    """How one family writes a call."""

    name: str
    example: str  # one call, for the system prompt of a template that cannot describe tools itself
    markers: tuple[str, ...] = ()  # special tokens of the format, kept in the generated text
    starts: tuple[str, ...] = ()  # how output that is a call begins (besides "{" and "[")
    short_ids: bool = False  # Mistral's templates accept only 9-character alphanumeric call ids


FORMATS: dict[str, ToolFormat] = {f.name: f for f in (
    ToolFormat("json", '{"name": "TOOL_NAME", "arguments": {...}}'),
    ToolFormat("llama3", '{"name": "TOOL_NAME", "parameters": {...}}', ("<|python_tag|>",), ("<|python_tag|>",)),
    ToolFormat("hermes", '<tool_call>\n{"name": "TOOL_NAME", "arguments": {...}}\n</tool_call>',
               ("<tool_call>", "</tool_call>"), ("<tool_call>",)),
    ToolFormat("mistral", "[TOOL_CALLS]TOOL_NAME[ARGS]{...}", ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
               ("[TOOL_CALLS]",), short_ids=True),
    ToolFormat("mistral-json", '[TOOL_CALLS][{"name": "TOOL_NAME", "arguments": {...}}]', ("[TOOL_CALLS]",),
               ("[TOOL_CALLS]",), short_ids=True),
    ToolFormat("phi4", '<|tool_call|>[{"name": "TOOL_NAME", "arguments": {...}}]<|/tool_call|>',
               ("<|tool_call|>", "<|/tool_call|>"), ("<|tool_call|>",)),
    ToolFormat("granite", '<|tool_call|>[{"name": "TOOL_NAME", "arguments": {...}}]', ("<|tool_call|>",),
               ("<|tool_call|>",)),
    ToolFormat("harmony", "<|channel|>commentary to=functions.TOOL_NAME <|constrain|>json<|message|>{...}",
               ("<|start|>", "<|channel|>", "<|constrain|>", "<|message|>", "<|end|>"), ("<|channel|>", "<|start|>")),
)}

# Output that begins with one of these may be a call (streaming holds it back until it is known).
CALL_STARTS: tuple[str, ...] = tuple(dict.fromkeys(("{", "[", *(s for f in FORMATS.values() for s in f.starts))))


def tool_format(name: str | None) -> ToolFormat:
    """The format called `name` ("json" for None); unknown names are an error that lists the known."""
    fmt = FORMATS.get(name or "json")
    if fmt is None:
        raise ValueError(f"unknown tool-call format {name!r} (known: {', '.join(FORMATS)})")
    return fmt


def detect_tool_format(source: str) -> str:
    """The format a chat template's source writes calls in (checked from the most specific)."""
    if "to=functions." in source or "<|channel|>" in source:
        return "harmony"
    if "[TOOL_CALLS]" in source:
        return "mistral" if "[ARGS]" in source else "mistral-json"
    if "<|/tool_call|>" in source or "<|tool|>" in source:
        return "phi4"
    if "<|tool_call|>" in source:
        return "granite"
    if "<tool_call>" in source:
        return "hermes"
    if "<|python_tag|>" in source or "ipython" in source:
        return "llama3"
    return "json"


# ---- parsing ------------------------------------------------------------------------------------

_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_PIPE_BLOCK = re.compile(r"<\|tool_call\|>(.*?)(?:<\|/tool_call\|>|$)", re.DOTALL)
_NAME = r"[A-Za-z_][A-Za-z0-9_.\-]*"
_MISTRAL_CALL = re.compile(rf"(?:\[TOOL_CALLS\])?\s*({_NAME})\s*(?:\[CALL_ID\]\s*([A-Za-z0-9]+)\s*)?\[ARGS\]\s*")
_HARMONY_CALL = re.compile(rf"to=functions\.({_NAME})")
_DECODER = json.JSONDecoder()


def parse_tool_calls(text: str, tool_format: str | None = None) -> list[ToolCall]:
    """Tool calls in generated text, in any of the formats above (`tool_format`, the template's,
    only decides the style of call ids). `arguments` given as a JSON string (OpenAI style) are
    decoded. Text that is not a call, or a call cut off or malformed, gives no call."""
    if not isinstance(text, str):
        return []
    if "to=functions." in text:
        calls = _harmony_calls(text)
    elif "[ARGS]" in text:
        calls = _mistral_calls(text)
    elif "[TOOL_CALLS]" in text:
        calls = _calls_in(text.split("[TOOL_CALLS]", 1)[1].replace("[TOOL_CALLS]", " "))
    elif "<|tool_call|>" in text:
        calls = [c for block in _PIPE_BLOCK.findall(text) for c in _calls_in(block)]
    elif "<tool_call>" in text:
        calls = [c for block in _HERMES_BLOCK.findall(text) for c in _calls_in(block)]
    else:
        calls = _calls_in(text.replace("<|python_tag|>", ""))
    if FORMATS.get(tool_format or "", FORMATS["json"]).short_ids or "[TOOL_CALLS]" in text:
        calls = [c if _is_short_id(c.id) else ToolCall(c.name, c.arguments, short_call_id()) for c in calls]
    return calls


def short_call_id() -> str:
    """A 9-character alphanumeric call id, the only kind Mistral's templates accept."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(9))


def _is_short_id(call_id: str) -> bool:
    return len(call_id) == 9 and call_id.isalnum() and call_id.isascii()


def _mistral_calls(text: str) -> list[ToolCall]:
    calls = []
    for match in _MISTRAL_CALL.finditer(text):
        arguments = _object_at(text, match.end())
        if arguments is not None:
            call_id = match.group(2)
            calls.append(ToolCall(match.group(1), arguments, call_id) if call_id else ToolCall(match.group(1), arguments))
    return calls


def _harmony_calls(text: str) -> list[ToolCall]:
    """`to=functions.NAME` in the channel or the role header, then the arguments after <|message|>."""
    calls = []
    matches = list(_HARMONY_CALL.finditer(text))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        message = text.find("<|message|>", match.end(), end)
        start = message + len("<|message|>") if message >= 0 else text.find("{", match.end(), end)
        arguments = _object_at(text, start) if start >= 0 else None
        if arguments is not None:
            calls.append(ToolCall(match.group(1), arguments))
    return calls


def _object_at(text: str, pos: int) -> dict | None:
    """The JSON object that starts at `pos` (after blanks), or None."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    try:
        value, _ = _DECODER.raw_decode(text, pos)
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _calls_in(text: str) -> list[ToolCall]:
    """Calls written as JSON objects (or lists of them) anywhere in text."""
    calls: list[ToolCall] = []
    for value in _json_values(text):
        for item in value if isinstance(value, list) else [value]:
            call = _as_tool_call(item)
            if call is not None:
                calls.append(call)
    return calls


def _json_values(text: str):
    """Every top-level JSON object or array embedded in text, left to right."""
    pos = 0
    while True:
        starts = [i for i in (text.find("{", pos), text.find("[", pos)) if i >= 0]
        if not starts:
            return
        start = min(starts)
        try:
            value, end = _DECODER.raw_decode(text, start)
        except (json.JSONDecodeError, RecursionError):
            pos = start + 1
            continue
        yield value
        pos = end


def _as_tool_call(item: Any) -> ToolCall | None:
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("function"), dict):  # OpenAI {"type": "function", "function": {...}}
        return _as_tool_call(item["function"])
    name = item.get("name")
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            return None
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    if "id" in item and isinstance(item["id"], str):
        return ToolCall(name, arguments, id=item["id"])
    return ToolCall(name, arguments)
