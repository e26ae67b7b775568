"""An MCP server for the tests, written with the mcp package's server API (MCPServer, the
former FastMCP). `python mcp_server.py` serves over stdio; `python mcp_server.py PORT` serves
streamable HTTP at http://127.0.0.1:PORT/mcp."""

from __future__ import annotations

import os
import sys
from typing import Annotated

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field

server = MCPServer("pie-local-test-tools", log_level="WARNING")


class Point(BaseModel):
    x: int
    y: int


# bounded, as real tools' schemas often are: the constraint then ends each number within 7
# characters (an unbounded integer lets a base model write digits until max_tokens)
Small = Annotated[int, Field(ge=-999_999, le=999_999)]


@server.tool()
def add(a: Small, b: Small) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def shout(text: str) -> str:
    """The text in capital letters."""
    return text.upper()


@server.tool()
def manhattan(a: Point, b: Point) -> int:
    """Manhattan distance between two points."""
    return abs(a.x - b.x) + abs(a.y - b.y)


@server.tool()
def fail(reason: str) -> str:
    """Always fails, with the reason given."""
    raise ToolError(reason)


@server.tool()
def server_pid() -> int:
    """The server's process id (to see that it ends with its client)."""
    return os.getpid()


if __name__ == "__main__":
    if len(sys.argv) > 1:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[1]))
    else:
        server.run()
