"""Tools: plain Python functions that a model can call.

    def get_weather(city: str, unit: Literal["C", "F"] = "C") -> str:
        '''Current weather for a city.

        Args:
            city: Name of the city.
            unit: Temperature unit.
        '''

    tool = Tool.from_function(get_weather)
    tool.schema        # {"name": "get_weather", "description": ..., "parameters": {JSON schema}}
    result = await tool.call({"city": "Paris"})   # ToolResult; result.text goes back to the model

Arguments are validated against the schema before the function runs; a bad call (unknown tool,
wrong type, missing argument) or an exception inside the function becomes an error text for
the model, never a crash of the inferlet. `tool_call_constraint(tools)` forces the model to emit a
well-formed call to one of the tools, so even a small base model produces a parseable call.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

from pie_local.models.tool_formats import ToolCall, parse_tool_calls
from pie_local.models.tool_formats import tool_format as tool_format_named
from pie_local.runtime.constraints import Constraint, ConstraintState, Grammar, JsonSchema

__all__ = ["Tool", "ToolCall", "ToolResult", "ToolError", "call_tool", "parse_tool_calls",
           "tool_call_constraint", "tool_call_schema"]


class ToolError(ValueError):
    """A function that cannot be described as a tool (unsupported annotation, bad name)."""


@dataclass
class ToolResult:
    """What a call produced: `text` is what the model reads next."""

    name: str
    ok: bool
    value: Any = None
    error: str | None = None

    @property
    def text(self) -> str:
        if not self.ok:
            return f"Error: {self.error}"
        if isinstance(self.value, str):
            return self.value
        try:
            return json.dumps(self.value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            return str(self.value)

    def to_message(self, call: ToolCall | None = None) -> dict[str, Any]:
        """A chat message with role "tool" carrying this result."""
        message = {"role": "tool", "name": self.name, "content": self.text}
        if call is not None:
            message["tool_call_id"] = call.id
        return message


# ---- schema from type hints ---------------------------------------------------------------------

_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean"}
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


def _schema_for(annotation: Any, where: str) -> dict[str, Any]:
    """JSON schema of a type hint: str/int/float/bool, list[X], dict[str, X], Literal, Optional, Enum."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return {}
    if annotation in _SIMPLE:
        return {"type": _SIMPLE[annotation]}
    if annotation is type(None):
        return {"type": "null"}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return {"enum": [member.value for member in annotation]}
    if annotation in (list, tuple, set):
        return {"type": "array"}
    if annotation is dict:
        return {"type": "object"}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        schema = _schema_for(options[0], where) if len(options) == 1 else {
            "anyOf": [_schema_for(a, where) for a in options]}
        if len(options) < len(args):  # Optional[X]: X or null
            return {"anyOf": [schema, {"type": "null"}]}
        return schema
    if origin in (list, Sequence, set, tuple):
        if origin is tuple and (len(args) != 2 or args[1] is not Ellipsis):
            raise ToolError(f"{where}: fixed-length tuples are not supported, use list[X]")
        return {"type": "array", "items": _schema_for(args[0], where)} if args else {"type": "array"}
    if origin is dict:
        if args and args[0] is not str:
            raise ToolError(f"{where}: dict keys must be str (JSON object keys)")
        return {"type": "object", "additionalProperties": _schema_for(args[1], where)} if args else {"type": "object"}
    raise ToolError(f"{where}: unsupported type {annotation!r} (use str, int, float, bool, list, dict, "
                    "Literal, Optional or an Enum)")


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(summary, {param: description}) from a Google-style docstring with an `Args:` section."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    summary_lines: list[str] = []
    for line in lines:
        if not line.strip() or re.match(r"^\s*(Args|Arguments|Parameters|Returns|Raises)\s*:", line):
            break
        summary_lines.append(line.strip())
    params: dict[str, str] = {}
    in_args, current, indent = False, None, 0
    for line in lines:
        if re.match(r"^(Args|Arguments|Parameters)\s*:\s*$", line.strip()):
            in_args, current = True, None
            continue
        if not in_args:
            continue
        if line.strip() and not line.startswith((" ", "\t")):  # next unindented section ends Args
            break
        match = re.match(r"^(\s+)\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line)
        if match and (current is None or len(match.group(1)) <= indent):
            indent, current = len(match.group(1)), match.group(2)
            params[current] = match.group(3).strip()
        elif current is not None and line.strip():
            params[current] = f"{params[current]} {line.strip()}".strip()
    return " ".join(summary_lines), params


# ---- validation ---------------------------------------------------------------------------------


def _check(value: Any, schema: dict[str, Any], path: str) -> Any:
    """Validate `value` against the schema subset that _schema_for produces; return it converted
    (int for whole floats in integer fields). Raises ValueError with a message for the model."""
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                return _check(value, option, path)
            except ValueError as e:
                if option.get("type") != "null":  # "must be null" only confuses an Optional's error
                    errors.append(str(e))
        raise ValueError(" or ".join(errors) or f"{path} must be null")
    if "enum" in schema:
        # 1 == True in Python, not in JSON: compare bools only with bools.
        if not any(v == value and isinstance(v, bool) == isinstance(value, bool) for v in schema["enum"]):
            raise ValueError(f"{path} must be one of {json.dumps(schema['enum'])}, got {json.dumps(value)}")
        return value
    kind = schema.get("type")
    if kind is None:
        return value
    if kind == "null" and value is None:
        return None
    if kind == "string" and isinstance(value, str):
        return value
    if kind == "boolean" and isinstance(value, bool):
        return value
    if kind == "integer" and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    if kind == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if kind == "array" and isinstance(value, list):
        items = schema.get("items", {})
        return [_check(v, items, f"{path}[{i}]") for i, v in enumerate(value)]
    if kind == "object" and isinstance(value, dict):
        return _check_object(value, schema, path)
    raise ValueError(f"{path} must be {_describe(kind)}, got {json.dumps(value, default=str)}")


def _check_object(value: dict, schema: dict[str, Any], path: str) -> dict:
    props = schema.get("properties", {})
    missing = [k for k in schema.get("required", []) if k not in value]
    if missing:
        raise ValueError(f"missing required argument{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(repr(m) for m in missing)}" + (f" in {path}" if path else ""))
    extra_schema = schema.get("additionalProperties", {} if not props else False)
    out = {}
    for key, v in value.items():
        where = f"{path}.{key}" if path else key
        if key in props:
            out[key] = _check(v, props[key], where)
        elif extra_schema is False:
            raise ValueError(f"unknown argument {key!r}; expected {', '.join(repr(k) for k in props)}")
        else:
            out[key] = _check(v, extra_schema, where)
    return out


def _describe(kind: str) -> str:
    return {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
            "array": "an array", "object": "an object", "null": "null"}.get(kind, kind)


# ---- tools --------------------------------------------------------------------------------------


@dataclass
class Tool:
    """A callable offered to the model, with the JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]

    @classmethod
    def from_function(cls, fn: Callable[..., Any], name: str | None = None,
                      description: str | None = None) -> Tool:
        """Describe `fn` from its signature (type hints, defaults) and docstring (summary, Args:)."""
        name = name or fn.__name__
        if not _NAME_RE.match(name):
            raise ToolError(f"tool name {name!r} must be 1-64 letters, digits, '_', '.', '-'")
        summary, param_docs = _parse_docstring(inspect.getdoc(fn))
        try:
            hints = typing.get_type_hints(fn)
        except Exception as e:
            raise ToolError(f"{name}: cannot resolve type hints ({e})") from None
        properties: dict[str, Any] = {}
        required: list[str] = []
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ToolError(f"{name}: *args/**kwargs cannot be described to a model")
            if p.kind is p.POSITIONAL_ONLY:
                raise ToolError(f"{name}: positional-only parameter {p.name!r} cannot be passed by name")
            schema = _schema_for(hints.get(p.name, p.annotation), f"{name}({p.name})")
            if p.name in param_docs:
                schema["description"] = param_docs[p.name]
            if p.default is p.empty:
                required.append(p.name)
            elif isinstance(p.default, (str, int, float, bool, type(None), list, dict)):
                schema["default"] = p.default
            elif isinstance(p.default, enum.Enum):
                schema["default"] = p.default.value
            properties[p.name] = schema
        parameters = {"type": "object", "properties": properties, "required": required,
                      "additionalProperties": False}
        return cls(name=name, description=description or summary, parameters=parameters, fn=fn)

    @property
    def schema(self) -> dict[str, Any]:
        """The function description models are shown: name, description, parameters."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def to_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": self.schema}

    def validate(self, arguments: Any) -> dict[str, Any]:
        """Checked (and converted: enums, whole floats -> int) keyword arguments, or ValueError."""
        if not isinstance(arguments, dict):
            raise ValueError(f"arguments must be a JSON object, got {json.dumps(arguments, default=str)}")
        checked = _check_object(arguments, self.parameters, "")
        hints = typing.get_type_hints(self.fn)
        for key, value in checked.items():
            hint = hints.get(key)
            for candidate in (hint, *typing.get_args(hint)):
                if isinstance(candidate, type) and issubclass(candidate, enum.Enum) and value is not None:
                    checked[key] = candidate(value)
        return checked

    async def call(self, arguments: Any) -> ToolResult:
        """Validate and run (sync functions in a worker thread); errors become the result's text."""
        try:
            kwargs = self.validate(arguments)
        except ValueError as e:
            return ToolResult(self.name, ok=False, error=f"invalid arguments for {self.name}: {e}")
        try:
            if inspect.iscoroutinefunction(self.fn):
                value = await self.fn(**kwargs)
            else:
                value = await asyncio.to_thread(self.fn, **kwargs)
                if inspect.isawaitable(value):
                    value = await value
        except asyncio.CancelledError:
            raise
        except Exception as e:
            return ToolResult(self.name, ok=False, error=f"{self.name} raised {type(e).__name__}: {e}")
        return ToolResult(self.name, ok=True, value=value)


def as_tools(tools: Sequence[Tool | Callable[..., Any]]) -> list[Tool]:
    """Tools from a mix of Tool objects and plain functions; names must be unique."""
    out = [t if isinstance(t, Tool) else Tool.from_function(t) for t in tools]
    names = [t.name for t in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ToolError(f"duplicate tool names: {', '.join(duplicates)}")
    return out


async def call_tool(tools: Sequence[Tool], call: ToolCall) -> ToolResult:
    """Run the tool a call names; an unknown name is an error result listing the known ones."""
    for tool in tools:
        if tool.name == call.name:
            return await tool.call(call.arguments)
    known = ", ".join(t.name for t in tools) or "none"
    return ToolResult(call.name, ok=False, error=f"unknown tool {call.name!r} (available: {known})")


# ---- forcing a call -----------------------------------------------------------------------------


def tool_call_schema(tools: Sequence[Tool], arguments_key: str = "arguments") -> dict[str, Any]:
    """JSON schema of one call: {"name": <one tool>, "<arguments_key>": <that tool's arguments>}.
    An object that lists its properties and says nothing of others (as pydantic and MCP servers
    write them) is closed here: a forced call writes only the arguments a tool declares."""
    if not tools:
        raise ToolError("no tools to call")
    defs: dict[str, Any] = {}
    options = [{"type": "object",
                "properties": {"name": {"const": t.name}, arguments_key: _embedded(t, defs)},
                "required": ["name", arguments_key], "additionalProperties": False} for t in tools]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "$defs": defs} if defs else schema


_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})  # values, not schemas


def _embedded(tool: Tool, defs: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameters as a part of the call's schema. Parameters with references of their own
    ("$ref": "#/$defs/Point", as pydantic and MCP servers write them) move to the call schema's
    $defs under the tool's name, their references rewritten to point there."""
    parameters = _closed(tool.parameters)
    if not _has_local_ref(parameters):
        return parameters
    pointer = "#/$defs/" + tool.name.replace("~", "~0").replace("/", "~1")
    defs[tool.name] = _rebased(parameters, pointer)
    return {"$ref": pointer}


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalItems", "additionalProperties", "not", "if", "then", "else", "contains")


def _closed(schema: Any) -> Any:
    """A copy of a schema where objects with properties and no word on others allow no others."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _closed(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS + _SUBSCHEMAS:
        if isinstance(out.get(key), list):
            out[key] = [_closed(sub) for sub in out[key]]
        elif key in out:
            out[key] = _closed(out[key])
    if "properties" in out and not {"additionalProperties", "patternProperties", "unevaluatedProperties"} & set(out):
        out["additionalProperties"] = False
    return out


def _has_local_ref(node: Any) -> bool:
    if isinstance(node, list):
        return any(_has_local_ref(item) for item in node)
    if not isinstance(node, dict):
        return False
    return any((key == "$ref" and isinstance(value, str) and value.startswith("#"))
               or (key not in _DATA_KEYWORDS and _has_local_ref(value)) for key, value in node.items())


def _rebased(node: Any, pointer: str) -> Any:
    """A copy of a schema whose local references ("#...") resolve under `pointer`."""
    if isinstance(node, list):
        return [_rebased(item, pointer) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = pointer + value[1:]
        else:
            out[key] = value if key in _DATA_KEYWORDS else _rebased(value, pointer)
    return out


def tool_call_constraint(tools: Sequence[Tool], tool_format: str = "json") -> Constraint:
    """A constraint under which the model can only write one valid call, in the chat template's
    tool format (see models/tool_formats.py): "json" a bare object, "llama3" its "parameters" key,
    the others their markers around it. A marker the vocab has as a special token is written as
    that token, the way the model was trained to write it."""
    fmt = tool_format_named(tool_format)
    if fmt.name in ("json", "llama3"):
        return JsonSchema(tool_call_schema(tools, "parameters" if fmt.name == "llama3" else "arguments"))
    return ToolCallGrammar(tools, fmt.name)


class ToolCallGrammar(Grammar):
    """One call in a format with markers. Checked at creation with the markers as text; bind()
    compiles it again with each marker as the tokenizer's vocab has it (a special token or text)."""

    kind = "tool-call grammar"

    def __init__(self, tools: Sequence[Tool], tool_format: str) -> None:
        if not tools:
            raise ToolError("no tools to call")
        self.tools, self.tool_format = list(tools), tool_format
        super().__init__(_call_lark(self.tools, tool_format, json.dumps))

    def bind(self, tokenizer: Any) -> ConstraintState:
        # An llguidance tokenizer or a test double has no vocab to ask: its markers are text.
        special_token = getattr(tokenizer, "special_token", None)
        if special_token is None:
            return super().bind(tokenizer)

        def marker(text: str) -> str:
            token = special_token(text)
            return json.dumps(text) if token is None else f"<[{token}]>"

        lark = _call_lark(self.tools, self.tool_format, marker)
        return super().bind(tokenizer) if lark == self.text else Grammar(lark).bind(tokenizer)


def _call_lark(tools: Sequence[Tool], tool_format: str, m: Callable[[str], str]) -> str:
    """The Lark grammar of one call; `m(marker)` writes a marker (a string literal or <[id]>)."""

    def schema(value: dict[str, Any]) -> str:
        # compact JSON, and llguidance's JsonSchema defaults (x-guidance: its schema options)
        return json.dumps({**value, "x-guidance": {"whitespace_flexible": False, "lenient": True,
                                                   "coerce_one_of": True}})

    if tool_format in ("mistral", "harmony"):  # the name is outside the JSON: one rule per tool
        if tool_format == "mistral":
            head, between = m("[TOOL_CALLS]"), m("[ARGS]")
        else:
            head = f'{m("<|channel|>")} "commentary to=functions."'
            between = f'" " {m("<|constrain|>")} "json" {m("<|message|>")}'
        rules = [f"tool{i}: {json.dumps(t.name)} {between} args{i}\nargs{i}: %json {schema(_closed(t.parameters))}"
                 for i, t in enumerate(tools)]
        names = " | ".join(f"tool{i}" for i in range(len(tools)))
        return f"start: {head} ({names})\n" + "\n".join(rules) + "\n"
    call = f"call: %json {schema(tool_call_schema(tools))}\n"
    if tool_format == "hermes":
        return f'start: {m("<tool_call>")} "\\n" call "\\n" {m("</tool_call>")}\n' + call
    if tool_format == "mistral-json":
        return f'start: {m("[TOOL_CALLS]")} "[" call "]"\n' + call
    if tool_format == "phi4":
        return f'start: {m("<|tool_call|>")} "[" call "]" {m("<|/tool_call|>")}\n' + call
    if tool_format == "granite":
        return f'start: {m("<|tool_call|>")} "[" call "]"\n' + call
    raise ToolError(f"no call grammar for the tool format {tool_format!r}")
