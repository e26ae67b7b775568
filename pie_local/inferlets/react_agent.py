"""A ReAct agent: Thought / Action / Observation steps in one context. Each action is generated
under a JSON-schema constraint (a call to one of the tools, or the final answer), so even a small
base model writes a parseable call; the tool runs inline and its observation is appended to the
same KV (no re-prefill). Tools: a calculator, a file lookup confined to one directory, and the
tools of any MCP servers given (started from a command, or reached by URL; closed at the end).

    pie-local run react-agent -- --prompt 'What is 17 * 23?' --mcp 'python my_server.py'
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import operator
from pathlib import Path

from pie_local import JsonSchema, Param, SamplingParams, Tool
from pie_local.runtime.mcp import McpServer
from pie_local.runtime.tools import tool_call_schema

NAME = "react-agent"
DESCRIPTION = "ReAct agent with a calculator, file lookup and MCP servers' tools; tool calls are schema-constrained."
PARAMETERS = {
    "prompt": Param(str, required=True, help="the question to answer"),
    "tools": Param(str, default=None, help="comma-separated tools to offer (default: calculator, lookup_file and "
                                           "every tool of the MCP servers)"),
    "files": Param(str, default=".", help="directory lookup_file may read from"),
    "mcp": Param(str, default=None, help="MCP servers to start and use (stdio), commands separated by ';', "
                                         "e.g. 'python server.py'"),
    "mcp_url": Param(str, default=None, help="MCP servers to use over streamable HTTP, URLs separated by ';'"),
    "max_steps": Param(int, default=4, help="actions at most before a final answer is forced"),
    "min_calls": Param(int, default=1, help="the first this many actions must be tool calls"),
    "thoughts": Param(bool, default=True, help="let the model write a Thought line before each action"),
    "thought_tokens": Param(int, default=32, help="tokens per thought at most"),
    "temperature": Param(float, default=0.0, help="0 = greedy"),
    "seed": Param(int, default=None, help="seed for reproducible sampling"),
}

# ---------------------------------------------------------------------------------- the tools

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "log": math.log, "exp": math.exp, "sin": math.sin, "cos": math.cos,
              "tan": math.tan, "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil}
_CONSTANTS = {"pi": math.pi, "e": math.e}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS \
            and not node.keywords:
        return _FUNCTIONS[node.func.id](*(_evaluate(a) for a in node.args))
    raise ValueError(f"unsupported expression: {ast.unparse(node)!r}")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: Numbers with + - * / // % ** and parentheses, e.g. "17 * 23".
    """
    try:
        value = _evaluate(ast.parse(expression.replace("^", "**"), mode="eval"))
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(value)


def make_lookup_file(root: Path):
    root = root.resolve()

    def lookup_file(path: str) -> str:
        """Read a text file.

        Args:
            path: File name, relative to the agent's files directory.
        """
        target = (root / path).resolve()
        if root != target and root not in target.parents:
            raise ValueError(f"{path!r} is outside the files directory")
        if not target.is_file():
            names = sorted(p.name for p in root.iterdir() if p.is_file())[:20]
            raise ValueError(f"no file {path!r}; files: {', '.join(names) or 'none'}")
        return target.read_text(errors="replace")[:2000]

    return lookup_file


FINAL = "final_answer"


def action_schema(tools: list[Tool], allow_final: bool) -> dict:
    """One action: a call to one of ``tools``, or (when allowed) the final answer."""
    for tool in tools:  # keep calls short enough to always finish within the action budget
        for prop in tool.parameters.get("properties", {}).values():
            if prop.get("type") == "string":
                prop.setdefault("maxLength", 80)
    options = []
    if tools:
        calls = tool_call_schema(tools)
        options += calls.get("anyOf", [calls])
    if allow_final:
        options.append({"type": "object", "properties": {
            "name": {"const": FINAL},
            "arguments": {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 200}},
                          "required": ["answer"], "additionalProperties": False}},
            "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def header(tools: list[Tool], question: str) -> str:
    lines = ["Answer the question by using tools. Each action is one JSON object on one line.", "Tools:"]
    for t in tools:
        lines.append(f"- {t.name}: {t.description} Arguments: {json.dumps(t.parameters.get('properties', {}))}")
    lines.append(f'- {FINAL}: Give the answer. Arguments: {{"answer": "..."}}')
    lines += ["", "Question: What is 3 + 4?",
              "Thought: I should add the numbers.",
              'Action: {"name":"calculator","arguments":{"expression":"3 + 4"}}',
              "Observation: 7",
              'Action: {"name":"final_answer","arguments":{"answer":"7"}}', "",
              f"Question: {question}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- the agent

def mcp_servers(args) -> list[McpServer]:
    commands = [McpServer.parse(c) for c in (args.mcp or "").split(";") if c.strip()]
    return commands + [McpServer.http(u.strip()) for u in (args.mcp_url or "").split(";") if u.strip()]


async def main(rt, args):
    available = {"calculator": Tool.from_function(calculator),
                 "lookup_file": Tool.from_function(make_lookup_file(Path(args.files)))}
    async with contextlib.AsyncExitStack() as servers:  # MCP servers close when the agent ends
        for server in mcp_servers(args):
            await servers.enter_async_context(server)
            tools = await server.tools()
            for tool in tools:
                if tool.name in available:
                    raise ValueError(f"two tools are named {tool.name!r} (one from MCP server {server.label!r})")
                available[tool.name] = tool
            rt.send({"event": "mcp_server", "server": server.label, "tools": [t.name for t in tools]})
        names = [n.strip() for n in args.tools.split(",") if n.strip()] if args.tools else list(available)
        unknown = [n for n in names if n not in available]
        if unknown or not names:
            raise ValueError(f"unknown tools {unknown}; available: {', '.join(available)}")
        return await run_agent(rt, args, [available[n] for n in names])


async def run_agent(rt, args, tools: list[Tool]) -> dict:
    sampling = SamplingParams(temperature=args.temperature, seed=args.seed)
    ctx = rt.context()
    ctx.fill(header(tools, args.prompt))
    steps: list[dict] = []
    answer = None
    for step in range(args.max_steps + 1):
        thought = ""
        if args.thoughts:
            ctx.fill("Thought:")
            thought = (await ctx.generate(sampling, max_tokens=args.thought_tokens, stop=["\n"])).strip()
            ctx.fill("\n")
        if step == args.max_steps:  # out of steps: only the final answer is allowed
            schema = action_schema([], allow_final=True)
        else:
            schema = action_schema(tools, allow_final=step >= args.min_calls)
        ctx.fill("Action: ")
        raw = await ctx.generate(sampling, max_tokens=160, constrain=JsonSchema(schema))
        record = {"thought": thought, "action": raw}
        try:
            action = json.loads(raw)
        except ValueError:
            record["observation"] = "Error: the action was cut off before it was complete"
            ctx.fill(f"\nObservation: {record['observation']}\n")
            steps.append(record)
            continue
        if action["name"] == FINAL:
            answer = action["arguments"]["answer"]
            steps.append(record)
            rt.emit(answer)
            break
        result = await next(t for t in tools if t.name == action["name"]).call(action["arguments"])
        record.update(call=action, observation=result.text)
        rt.send({"event": "tool_call", "name": action["name"], "arguments": action["arguments"],
                 "result": result.text})
        ctx.fill(f"\nObservation: {result.text}\n")  # the result joins the same KV
        steps.append(record)
    await ctx.flush()
    return {"answer": answer, "steps": steps, "calls": sum(1 for s in steps if "call" in s), "transcript": ctx.text}
