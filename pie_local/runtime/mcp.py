"""The tools of MCP servers (Model Context Protocol), through the `mcp` package.

    async with McpServer.stdio("python", "server.py") as server:   # or McpServer.http("http://127.0.0.1:8000/mcp")
        tools = await server.tools()           # pie_local Tool objects
        text = await ctx.generate(tools=tools) # the model calls them inline, on the same KV

`McpServer.parse(spec)` opens what a user types: a streamable-HTTP URL, or a command line that
starts a stdio server. Calling a tool sends tools/call on the server's session: the server checks
the arguments against its own schema, and its error, like any failure, comes back as the result's
text for the model, never as an exception in the inferlet. The connection (and a stdio server's
process) closes when the `async with` ends: opened in an inferlet's main(), it closes when the
inferlet ends, however it ends.
"""

from __future__ import annotations

import shlex
import sys
from contextlib import AsyncExitStack
from typing import Any, TextIO

from pie_local.runtime.tools import Tool, ToolResult

__all__ = ["McpServer", "McpTool"]


class McpServer:
    """One MCP server: a stdio command or a streamable-HTTP URL. Use it as an async context manager."""

    def __init__(self, target: Any, *, label: str | None = None, timeout: float = 60.0,
                 errlog: TextIO | None = None) -> None:
        """`target` is a URL or an `mcp.StdioServerParameters`; `timeout` bounds each request;
        a stdio server's stderr goes to `errlog` (default: this process's stderr)."""
        self.target = target
        self.label = label or (target if isinstance(target, str) else " ".join([target.command, *target.args]))
        self.timeout = timeout
        self.errlog = errlog
        self._stack: AsyncExitStack | None = None
        self._client: Any = None

    @classmethod
    def stdio(cls, command: str, *args: str, env: dict[str, str] | None = None, cwd: str | None = None,
              **options: Any) -> McpServer:
        """A server started as `command args...`, spoken to over its stdin and stdout."""
        from mcp import StdioServerParameters

        return cls(StdioServerParameters(command=command, args=list(args), env=env, cwd=cwd), **options)

    @classmethod
    def http(cls, url: str, **options: Any) -> McpServer:
        """A running server's streamable-HTTP endpoint, e.g. http://127.0.0.1:8000/mcp."""
        return cls(url, **options)

    @classmethod
    def parse(cls, spec: str, **options: Any) -> McpServer:
        """A URL (http:// or https://) or a command line ("python server.py --flag")."""
        spec = spec.strip()
        if spec.startswith(("http://", "https://")):
            return cls.http(spec, **options)
        words = shlex.split(spec)
        if not words:
            raise ValueError("an MCP server needs a URL or a command")
        return cls.stdio(*words, **options)

    # ---- lifetime --------------------------------------------------------------------------------

    async def __aenter__(self) -> McpServer:
        from mcp import Client
        from mcp.client.stdio import stdio_client

        if self._stack is not None:
            raise RuntimeError(f"MCP server {self.label!r} is already open")
        transport = self.target
        if not isinstance(transport, str):  # stdio: choose where the server's stderr goes
            transport = stdio_client(transport, errlog=self.errlog or sys.stderr)
        stack = AsyncExitStack()
        try:  # a client that fails to open has closed what it opened
            self._client = await stack.enter_async_context(Client(transport, read_timeout_seconds=self.timeout))
        except Exception as e:
            raise ConnectionError(f"cannot open MCP server {self.label!r}: {_describe(e)}") from e
        self._stack = stack
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        stack, self._stack, self._client = self._stack, None, None
        if stack is None:
            return False
        try:
            return bool(await stack.__aexit__(exc_type, exc, tb))
        except BaseException as closing:
            if exc is not None and _leaves(closing) == [exc]:
                return False  # the body's own error, wrapped in a group by the client's task group: raise it as is
            raise

    @property
    def is_open(self) -> bool:
        return self._client is not None

    # ---- tools -----------------------------------------------------------------------------------

    async def tools(self) -> list[McpTool]:
        """Every tool the server lists (all pages), as tools a generation can call."""
        client = self._open_client()
        found, cursor = [], None
        while True:
            page = await client.list_tools(cursor=cursor)
            found += [McpTool(self, t.name, t.description or t.title or "", t.input_schema) for t in page.tools]
            cursor = page.next_cursor
            if not cursor:
                return found

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolResult:
        """Run a tool on the server; its failure (or the connection's) is the result's error text."""
        client = self._open_client()
        try:
            result = await client.call_tool(name, arguments)
        except Exception as e:  # noqa: BLE001 — whatever went wrong, the model reads it, the inferlet goes on
            return ToolResult(name, ok=False, error=f"{name} failed on MCP server {self.label!r}: {_describe(e)}")
        text = "\n".join(_content_text(block) for block in result.content)
        if result.is_error:
            return ToolResult(name, ok=False, error=text or f"{name} failed")
        return ToolResult(name, ok=True, value=text if result.content else result.structured_content)

    def _open_client(self) -> Any:
        if self._client is None:
            raise RuntimeError(f"MCP server {self.label!r} is not open: use `async with` around its use")
        return self._client

    def __repr__(self) -> str:
        return f"McpServer({self.label!r}{', open' if self.is_open else ''})"


class McpTool(Tool):
    """A tool of an MCP server; calling it sends tools/call through the server's open session."""

    def __init__(self, server: McpServer, name: str, description: str, parameters: dict[str, Any]) -> None:
        async def send(**arguments: Any) -> ToolResult:
            return await server.call(name, arguments)

        super().__init__(name=name, description=description, parameters=parameters, fn=send)
        self.server = server

    def validate(self, arguments: Any) -> dict[str, Any]:
        """Only the shape: the server checks the arguments against its own schema."""
        if not isinstance(arguments, dict):
            raise ValueError(f"arguments must be a JSON object, got {type(arguments).__name__}")
        return arguments

    async def call(self, arguments: Any) -> ToolResult:
        try:
            arguments = self.validate(arguments)
        except ValueError as e:
            return ToolResult(self.name, ok=False, error=f"invalid arguments for {self.name}: {e}")
        return await self.server.call(self.name, arguments)


def _content_text(block: Any) -> str:
    """What the model reads of one content block of a result."""
    kind = getattr(block, "type", "")
    if kind == "text":
        return block.text
    if kind in ("image", "audio"):
        return f"[{kind} {block.mime_type}]"
    if kind == "resource_link":
        return f"[resource {block.uri}]"
    if kind == "resource":
        return getattr(block.resource, "text", None) or f"[resource {block.resource.uri}]"
    return f"[{kind or type(block).__name__}]"


def _leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or the error itself."""
    inner = getattr(error, "exceptions", None)
    return [leaf for e in inner for leaf in _leaves(e)] if inner else [error]


def _describe(error: BaseException) -> str:
    """An exception as one line; exception groups (anyio task groups) by their first cause."""
    while getattr(error, "exceptions", None):
        error = error.exceptions[0]
    return f"{type(error).__name__}: {error}"
