"""Tools: schema from signature + docstring, validation, sync/async calls, forced tool calls."""

from __future__ import annotations

import asyncio
import enum
import json
from pathlib import Path
from typing import Literal, Optional

import jsonschema
import numpy as np
import pytest

from pie_local.models.chat_template import ChatTemplate
from pie_local.models.tokenizer import Tokenizer
from pie_local.runtime.constraints import JsonSchema
from pie_local.runtime.tools import (Tool, ToolCall, ToolError, as_tools, call_tool, parse_tool_calls,
                                     tool_call_constraint, tool_call_schema)
from test_constraints import random_generate


class Unit(enum.Enum):
    CELSIUS = "C"
    FAHRENHEIT = "F"


def forecast(city: str, days: int = 1, unit: Unit = Unit.CELSIUS, detail: Literal["short", "long"] = "short",
             hours: list[int] | None = None, extra: Optional[dict[str, float]] = None, metric: bool = True,
             ratio: float = 0.5) -> dict:
    """Weather forecast for a city.

    Uses the cached model run.

    Args:
        city (str): Name of the city,
            with its country if ambiguous.
        days: How many days ahead.
        unit: Temperature unit.

    Returns:
        A forecast.
    """
    return {"city": city, "days": days, "unit": unit.value, "detail": detail, "hours": hours}


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


async def slow_echo(text: str) -> str:
    """Echo after a pause."""
    await asyncio.sleep(0.01)
    return text.upper()


def test_schema_from_signature_and_docstring() -> None:
    tool = Tool.from_function(forecast)
    assert tool.name == "forecast"
    assert tool.description == "Weather forecast for a city."
    assert tool.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "Name of the city, with its country if ambiguous."},
            "days": {"type": "integer", "description": "How many days ahead.", "default": 1},
            "unit": {"enum": ["C", "F"], "description": "Temperature unit.", "default": "C"},
            "detail": {"enum": ["short", "long"], "default": "short"},
            "hours": {"anyOf": [{"type": "array", "items": {"type": "integer"}}, {"type": "null"}], "default": None},
            "extra": {"anyOf": [{"type": "object", "additionalProperties": {"type": "number"}}, {"type": "null"}],
                      "default": None},
            "metric": {"type": "boolean", "default": True},
            "ratio": {"type": "number", "default": 0.5},
        },
        "required": ["city"],
        "additionalProperties": False,
    }
    jsonschema.Draft202012Validator.check_schema(tool.parameters)
    assert tool.to_openai() == {"type": "function", "function": tool.schema}


def test_unsupported_signatures() -> None:
    def star(*args: int) -> None: ...
    def weird(x: complex) -> None: ...
    def keys(d: dict[int, str]) -> None: ...
    for fn, message in [(star, r"\*args"), (weird, "unsupported type"), (keys, "keys must be str")]:
        with pytest.raises(ToolError, match=message):
            Tool.from_function(fn)
    with pytest.raises(ToolError, match="tool name"):
        Tool.from_function(add, name="has space")
    with pytest.raises(ToolError, match="duplicate tool names: add"):
        as_tools([add, Tool.from_function(add)])


async def test_call_validates_and_converts() -> None:
    tool = Tool.from_function(forecast)
    result = await tool.call({"city": "Paris", "days": 3.0, "unit": "F", "hours": [6, 12]})
    assert result.ok
    assert result.value == {"city": "Paris", "days": 3, "unit": "F", "detail": "short", "hours": [6, 12]}
    assert json.loads(result.text) == result.value
    assert result.to_message() == {"role": "tool", "name": "forecast", "content": result.text}


@pytest.mark.parametrize("arguments, message", [
    ({}, "missing required argument 'city'"),
    ({"city": 3}, "city must be a string, got 3"),
    ({"city": "x", "days": True}, "days must be an integer, got true"),
    ({"city": "x", "days": 1.5}, "days must be an integer, got 1.5"),
    ({"city": "x", "unit": "K"}, 'unit must be one of \\["C", "F"\\], got "K"'),
    ({"city": "x", "hours": [1, "2"]}, "hours\\[1\\] must be an integer"),
    ({"city": "x", "extra": {"a": "b"}}, "extra.a must be a number"),
    ({"city": "x", "country": "FR"}, "unknown argument 'country'"),
    (["Paris"], "arguments must be a JSON object"),
])
async def test_bad_arguments_become_error_text(arguments, message: str) -> None:
    result = await Tool.from_function(forecast).call(arguments)
    assert not result.ok
    assert result.text.startswith("Error: invalid arguments for forecast: ")
    assert __import__("re").search(message, result.text), result.text


async def test_async_tools_exceptions_and_unknown_names() -> None:
    tools = as_tools([add, slow_echo])
    assert (await call_tool(tools, ToolCall("slow_echo", {"text": "hi"}))).text == "HI"
    assert (await call_tool(tools, ToolCall("add", {"a": 2, "b": 40}))).value == 42

    def broken(x: int) -> int:
        """Always fails."""
        raise RuntimeError(f"no luck with {x}")

    failed = await Tool.from_function(broken).call({"x": 7})
    assert not failed.ok and failed.text == "Error: broken raised RuntimeError: no luck with 7"
    unknown = await call_tool(tools, ToolCall("mul", {}))
    assert unknown.text == "Error: unknown tool 'mul' (available: add, slow_echo)"


def test_tool_call_schema_is_a_union_of_the_tools() -> None:
    tools = as_tools([add, forecast])
    schema = tool_call_schema(tools)
    jsonschema.validate({"name": "add", "arguments": {"a": 1, "b": 2}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "add", "arguments": {"city": "x"}}, schema)
    with pytest.raises(ToolError, match="no tools"):
        tool_call_schema([])


def test_call_schema_embeds_references_and_closes_open_objects() -> None:
    """Parameters as pydantic and MCP servers write them: $defs/$ref, objects open to extra keys."""
    point = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    move = Tool("move", "Move.", {"type": "object", "$defs": {"P": point}, "properties": {"to": {"$ref": "#/$defs/P"}},
                                  "required": ["to"]}, fn=lambda to: to)
    schema = tool_call_schema([move, *as_tools([add])])
    jsonschema.validate({"name": "move", "arguments": {"to": {"x": 1}}}, schema)
    for bad in ({"to": {"x": 1, "y": 2}}, {"to": {"x": 1}, "speed": 3}, {"to": {"x": "1"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"name": "move", "arguments": bad}, schema)
    JsonSchema(schema, lenient=False)  # llguidance follows the moved references too
    assert move.parameters["$defs"]["P"] == point  # the tool's own schema is left as it was


@pytest.fixture(scope="module")
def tok(starter_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(starter_gguf)


@pytest.mark.parametrize("tool_format", ["json", "llama3", "hermes"])
@pytest.mark.parametrize("seed", range(4))
async def test_forced_tool_call_is_always_valid(tok: Tokenizer, tool_format: str, seed: int) -> None:
    tools = as_tools([add, forecast, slow_echo])
    state = tool_call_constraint(tools, tool_format).bind(tok)
    text = random_generate(state, tok, np.random.default_rng(seed), max_tokens=600)
    if tool_format == "hermes":
        assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>")
    [call] = parse_tool_calls(text)
    result = await call_tool(tools, call)
    # The only thing a random chooser cannot be forced into is a sensible value; the call itself
    # always names a real tool with arguments its function accepts.
    assert result.ok, (text, result.text)


def test_tools_rendered_for_the_starter_model(tok: Tokenizer) -> None:
    tmpl = ChatTemplate.for_model(tokenizer=tok)
    tools = as_tools([add])
    prompt = tmpl.render([{"role": "user", "content": "What is 2+3?"}], tools=tools)
    assert '"name": "TOOL_NAME", "arguments"' in prompt and "- add: Add two integers." in prompt
    assert json.dumps(tools[0].parameters) in prompt
