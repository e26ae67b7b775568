"""MCP tools against a real MCP server (tests/mcp_server.py, written with the mcp package's server
API) in a subprocess, over stdio and streamable HTTP: listing, calls and their errors, calls
inline on the same KV (ctx.generate(tools=...) and the react-agent on a scripted FakeDriver), the
server's lifetime, and the starter model made to call one through tool_call_constraint."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pie_local.bench.schemas import Case, Compiled, random_outputs
from pie_local.driver.fake import FakeTokenizer
from pie_local.models.tokenizer import Tokenizer
from pie_local.runtime import InferletCancelled
from pie_local.runtime.mcp import McpServer, McpTool
from pie_local.runtime.tools import ToolCall, call_tool, parse_tool_calls, tool_call_constraint, tool_call_schema
from test_inferlets_fake import make_driver, scripted
from test_runtime_context import make_engine
from test_runtime_context import scripted as chat_scripted

SERVER = Path(__file__).with_name("mcp_server.py")
COMMAND = f"{sys.executable} {SERVER}"


def stdio_server() -> McpServer:
    return McpServer.stdio(sys.executable, str(SERVER))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def http_url():
    """The test server on streamable HTTP, on a free loopback port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SERVER), str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the MCP test server did not listen on port {port}")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}/mcp"
    proc.terminate()
    proc.wait(timeout=10)


# ---- listing and calling -------------------------------------------------------------------------

async def test_stdio_server_lists_and_calls_its_tools():
    async with stdio_server() as server:
        tools = {t.name: t for t in await server.tools()}
        assert set(tools) == {"add", "shout", "manhattan", "fail", "server_pid"}
        add = tools["add"]
        assert isinstance(add, McpTool) and add.description == "Add two integers."
        assert add.parameters["required"] == ["a", "b"] and add.parameters["properties"]["a"]["type"] == "integer"
        assert (await add.call({"a": 2, "b": 3})).text == "5"
        point = await tools["manhattan"].call({"a": {"x": 1, "y": 2}, "b": {"x": 4, "y": 6}})
        assert point.ok and point.text == "7"
        # failures reach the model as text: the tool's own error, the server's argument check, ours
        failed = await tools["fail"].call({"reason": "disk on fire"})
        assert not failed.ok and "disk on fire" in failed.text
        bad = await add.call({"a": "two"})
        assert not bad.ok and "validation" in bad.text
        assert "must be a JSON object" in (await add.call([2, 3])).text
        unknown = await call_tool(list(tools.values()), ToolCall("subtract", {}))
        assert not unknown.ok and "available: add, shout" in unknown.text
        pid = int((await server.call("server_pid", {})).text)
        assert alive(pid) and pid != os.getpid()
    assert not alive(pid)  # the server process ended with the `async with`
    with pytest.raises(RuntimeError, match="not open"):
        await server.tools()


async def test_streamable_http_server(http_url):
    async with McpServer.parse(http_url) as server:
        tools = {t.name: t for t in await server.tools()}
        assert (await tools["shout"].call({"text": "mcp over http"})).text == "MCP OVER HTTP"
        assert server.label == http_url


async def test_servers_that_cannot_be_reached_fail_clearly():
    with pytest.raises(ConnectionError, match="cannot open MCP server 'no-such-command-xyz'"):
        async with McpServer.parse("no-such-command-xyz"):
            pass
    closed = f"http://127.0.0.1:{free_port()}/mcp"
    with pytest.raises(ConnectionError, match=f"cannot open MCP server '{closed}'"):
        async with McpServer.http(closed):
            pass
    with pytest.raises(ValueError, match="URL or a command"):
        McpServer.parse("  ")


# ---- inline on the same KV ------------------------------------------------------------------------

async def test_generate_calls_an_mcp_tool_inline():
    def reply(prompt: str) -> str:
        last_turn = prompt.rsplit("<start_of_turn>", 1)[-1]
        if last_turn.startswith("tool"):
            return "The sum is " + last_turn.split("\n", 1)[1].split("<end_of_turn>")[0]
        return '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 40}}</tool_call>'

    engine, driver = make_engine(chat_scripted(reply), page_size=16)  # five tools described: a long prompt
    async with engine, stdio_server() as server:
        ctx = engine.context()
        ctx.user("What is 2 + 40?")
        text = await ctx.generate(tools=await server.tools())
        assert text.endswith("The sum is 42")
        assert [c.name for c in ctx.last.tool_calls] == ["add"]
        assert [m["role"] for m in ctx.messages] == ["user", "assistant", "tool", "assistant"]
        assert ctx.messages[2]["content"] == "42"
        assert driver.stats.tokens <= len(ctx) + 1  # every context token computed once: no re-prefill


def pid_call_rule(tok=FakeTokenizer()):
    """The react-agent's model: short thoughts, and every action asks the server for its pid."""
    call_rule = scripted({"Action: ": '{"name":"server_pid","arguments":{}}'})
    thought_rule = scripted({"Thought:": " ask\n"})

    def rule(visible):
        text = tok.decode(visible)
        return (thought_rule if text.rfind("Thought:") > text.rfind("Action: ") else call_rule)(visible)

    return rule


async def test_react_agent_uses_mcp_tools_and_closes_the_servers_when_it_ends(http_url):
    from runtime_helpers import fake_engine

    async with fake_engine(make_driver(next_token=pid_call_rule())) as engine:
        handle = engine.launch("react-agent", {"prompt": "Which process?", "mcp": COMMAND, "tools": "server_pid",
                                               "max_steps": 1})
        data = [m.data async for m in handle.messages() if m.kind == "data"]
        result = await handle.result()
        [server] = [d for d in data if d["event"] == "mcp_server"]
        assert server["server"] == COMMAND and "add" in server["tools"]
        [call] = [d for d in data if d["event"] == "tool_call"]
        pid = int(call["result"])
        assert f"Observation: {pid}\n" in result["transcript"]  # the result joined the same KV
        assert not alive(pid)  # the stdio server ended with the inferlet
        # the same tools from the HTTP server too: two tools of one name cannot both be offered
        with pytest.raises(ValueError, match=f"two tools are named 'add' .*{http_url}"):
            await engine.run("react-agent", {"prompt": "x", "mcp": COMMAND, "mcp_url": http_url})


async def test_a_cancelled_agent_closes_its_mcp_server():
    from runtime_helpers import fake_engine

    async with fake_engine(make_driver(next_token=pid_call_rule())) as engine:
        handle = engine.launch("react-agent", {"prompt": "Which process?", "mcp": COMMAND, "tools": "server_pid",
                                               "max_steps": 10_000, "min_calls": 10_000})
        async for message in handle.messages():
            if message.kind == "data" and message.data["event"] == "tool_call":
                pid = int(message.data["result"])
                handle.cancel()
        with pytest.raises(InferletCancelled):
            await handle.result()
    for _ in range(50):  # the process is reaped as the client closes
        if not alive(pid):
            break
        await asyncio.sleep(0.1)
    assert not alive(pid)


# ---- forcing a call --------------------------------------------------------------------------------

async def test_forced_calls_of_mcp_tools_with_nested_schemas_are_valid(starter_gguf: Path):
    """Parameters with $defs/$ref (pydantic models) stay valid inside the call schema."""
    tok = Tokenizer.from_gguf(starter_gguf)
    async with stdio_server() as server:
        tools = [t for t in await server.tools() if t.name == "manhattan"]
        forced = Compiled(Case("manhattan", "mcp", tool_call_schema(tools)), tool_call_constraint(tools))
        outputs = random_outputs([forced] * 4, tok, max_tokens=300)
        assert sum(o.finished for o in outputs) >= 2
        for output in (o for o in outputs if o.finished):
            assert output.check.parsed and not output.check.error_keywords, output.text
            [call] = parse_tool_calls(output.text)
            result = await call_tool(tools, call)
            assert result.ok, (output.text, result.text)
            a, b = call.arguments["a"], call.arguments["b"]
            assert int(result.text) == abs(a["x"] - b["x"]) + abs(a["y"] - b["y"])


@pytest.mark.slow
@pytest.mark.real_driver
async def test_starter_model_calls_an_mcp_tool_on_the_same_kv(starter_gguf: Path):
    from pie_local.driver.types import DriverParams
    from pie_local.runtime.engine import Engine, EngineConfig
    from pie_local.runtime.sampling import SamplingParams

    try:
        from pie_local.driver import Driver  # noqa: F401
    except Exception:
        pytest.skip("the native driver is not built")
    config = EngineConfig(driver=DriverParams(n_threads=2, n_pages=256))
    async with Engine(str(starter_gguf), config) as engine, stdio_server() as server:
        tools = [t for t in await server.tools() if t.name == "add"]
        ctx = engine.context()
        ctx.fill("Tool: add(a, b) adds two integers.\nQuestion: What is 17 + 25?\nCall: ")
        text = await ctx.generate(SamplingParams(), max_tokens=48, constrain=tool_call_constraint(tools))
        [call] = parse_tool_calls(text)
        result = await call_tool(tools, call)
        assert result.ok and int(result.text) == call.arguments["a"] + call.arguments["b"], (text, result.text)
        assert json.loads(text)["name"] == "add"
        call_in_kv = list(ctx.token_ids)
        computed = ctx.kv_len  # the call's last tokens (the last sampled, any forced after it) are pending
        assert computed >= len(call_in_kv) - 4
        ctx.fill(f"\nResult: {result.text}\nAnswer:")  # the result joins the same context
        await ctx.generate(SamplingParams(), max_tokens=8, stop=["\n"])
        assert ctx.token_ids[:len(call_in_kv)] == call_in_kv and f"Result: {result.text}\nAnswer:" in ctx.text
        assert ctx.last.cached_tokens >= computed  # the prompt and the call were not computed again
