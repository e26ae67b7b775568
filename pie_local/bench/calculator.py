"""The tool of the runtime benchmark's tool loop: a calculator, the prompt that offers it and the
JSON schema each call is generated under. Both sides get the same prompt and schema, and the same
observation for each call, so they generate the same transcript."""

from __future__ import annotations

import ast
import copy
import json
import operator

from pie_local import Tool
from pie_local.runtime.tools import tool_call_schema

QUESTION = "What is (17 * 23) + (45 * 12) - 99, computed step by step?"

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
              ast.UAdd: operator.pos, ast.USub: operator.neg}


def _value(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:  # a model's 9**9**9 must not hang the loop
            raise ValueError("exponent too large")
        return _OPERATORS[type(node.op)](left, right)
    raise ValueError(f"unsupported expression: {ast.unparse(node)!r}")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: Numbers with + - * / // % ** and parentheses, e.g. "17 * 23".
    """
    try:
        value = _value(ast.parse(expression.replace("^", "**"), mode="eval").body)
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(value)


TOOL = Tool.from_function(calculator)


def tool_prompt(question: str = QUESTION) -> str:
    """The agent's prompt up to its first action: the tool, one worked example, the question."""
    lines = ["Answer the question by using tools. Each action is one JSON object on one line.", "Tools:",
             f"- {TOOL.name}: {TOOL.description} Arguments: {json.dumps(TOOL.parameters['properties'])}",
             '- final_answer: Give the answer. Arguments: {"answer": "..."}',
             "", "Question: What is 3 + 4?",
             "Thought: I should add the numbers.",
             'Action: {"name":"calculator","arguments":{"expression":"3 + 4"}}',
             "Observation: 7",
             'Action: {"name":"final_answer","arguments":{"answer":"7"}}', "",
             f"Question: {question}"]
    return "\n".join(lines) + "\n"


def call_schema() -> dict:
    """One calculator call; the expression is capped so a call always fits the action's budget."""
    schema = copy.deepcopy(tool_call_schema([TOOL]))
    schema["properties"]["arguments"]["properties"]["expression"]["maxLength"] = 80
    return schema


def observe(action: str) -> str:
    """What the model reads after ``action`` (a call as JSON): the result, or the error."""
    try:
        return calculator(json.loads(action)["arguments"]["expression"])
    except Exception as exc:  # noqa: BLE001 — a bad call is an observation, as in an agent
        return f"Error: {exc}"
