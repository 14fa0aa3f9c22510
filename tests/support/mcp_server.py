"""A real MCP server for the agent's MCP tests, written with the official SDK (MCPServer,
the SDK 2 name of FastMCP). Standalone: it imports only the SDK and the standard library,
so it runs as `python tests/support/mcp_server.py` from any directory.

    python mcp_server.py stdio [--hostile]
    python mcp_server.py http [--hostile]    # binds 127.0.0.1:0, prints the port, serves /mcp

Tools:
- lookup(key)          readOnlyHint: true        (runs without confirmation)
- delete_record(key)   destructiveHint: true     (needs confirmation)
- add_note(text)       no annotations            (not declared read-only: needs confirmation)
- sleep(seconds)       read-only; hangs that long (timeouts)
- crash()              read-only; the process exits at once (a dying server)
- big(chars)           read-only; a result of that many characters (result limits)
- fail(message)        read-only; the tool fails (an error result)
- env_names()          read-only; the names of the environment variables it sees
--hostile adds tools with bad names and bad schemas (they must be dropped by the client).

Environment: MCP_TEST_CALLS, a file each executed call appends a JSON line to (tests check
that a refused call never ran); MCP_TEST_TOKEN (http): the bearer token every request must
carry, else 401.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import Tool, ToolAnnotations

READ_ONLY = ToolAnnotations(read_only_hint=True)
DESTRUCTIVE = ToolAnnotations(read_only_hint=False, destructive_hint=True)
RECORDS = {"alpha": "first letter", "beta": "second letter"}


def _record(tool: str, arguments: dict[str, Any]) -> None:
    path = os.environ.get("MCP_TEST_CALLS")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"tool": tool, "arguments": arguments, "pid": os.getpid()})
                      + "\n")


def _hostile_tools() -> list[Tool]:
    obj = {"type": "object", "properties": {"a": {"type": "string"}}}
    deep: dict[str, Any] = {"type": "object"}
    node = deep
    for _ in range(40):
        node["properties"] = {"n": {"type": "object"}}
        node = node["properties"]["n"]
    return [
        Tool(name="bad name!", description="spaces and punctuation", input_schema=obj),
        Tool(name="n" * 100, description="too long a name", input_schema=obj),
        Tool(name="invalid_schema", description="a property whose type is not a type",
             input_schema={"type": "object", "properties": {"a": {"type": 7}}}),
        Tool(name="huge_schema", description="far too big", input_schema={
            "type": "object", "properties": {
                f"p{i}": {"type": "string", "description": "x" * 200} for i in range(400)}}),
        Tool(name="deep_schema", description="nests too deep", input_schema=deep),
        Tool(name="remote_ref", description="a $ref that leaves the document",
             input_schema={"type": "object",
                           "properties": {"a": {"$ref": "http://evil.example/s.json"}}}),
        Tool(name="bad_defs", description="a broken definition",
             input_schema={"type": "object", "properties": {}, "allOf": [{"type": "string"}],
                           "$defs": {"x": {"type": 7}}}),
        Tool(name="lookup", description="a second tool named lookup", input_schema=obj,
             annotations=READ_ONLY),
        Tool(name="long_description", description="d" * 50_000, input_schema=obj,
             annotations=READ_ONLY),
    ]


class TestServer(MCPServer):
    def __init__(self, hostile: bool) -> None:
        super().__init__("llmstack-test-tools", log_level="WARNING")
        self.hostile = hostile
        self._register()

    async def list_tools(self) -> list[Tool]:
        tools = await super().list_tools()
        return tools + (_hostile_tools() if self.hostile else [])

    def _register(self) -> None:
        @self.tool(annotations=READ_ONLY, description="Look a record up by key.")
        def lookup(key: str) -> str:
            _record("lookup", {"key": key})
            return RECORDS.get(key, f"no record {key!r}")

        @self.tool(annotations=DESTRUCTIVE, description="Delete a record by key.")
        def delete_record(key: str) -> str:
            _record("delete_record", {"key": key})
            existed = RECORDS.pop(key, None) is not None
            return f"deleted {key}" if existed else f"no record {key!r}"

        @self.tool(description="Add a note (no annotations: not declared read-only).")
        def add_note(text: str) -> str:
            _record("add_note", {"text": text})
            return f"noted: {text}"

        @self.tool(annotations=READ_ONLY, description="Sleep, then answer.")
        async def sleep(seconds: float) -> str:
            _record("sleep", {"seconds": seconds})
            await anyio.sleep(seconds)
            return "woke up"

        @self.tool(annotations=READ_ONLY, description="Exit the server process at once.")
        def crash() -> str:
            _record("crash", {})
            sys.stdout.flush()
            os._exit(3)

        @self.tool(annotations=READ_ONLY, description="Return a long text.")
        def big(chars: int) -> str:
            _record("big", {"chars": chars})
            return "x" * chars

        @self.tool(annotations=READ_ONLY, description="Fail with this message.")
        def fail(message: str) -> str:
            _record("fail", {"message": message})
            raise ToolError(message)

        @self.tool(annotations=READ_ONLY, description="Names of the environment variables.")
        def env_names() -> list[str]:
            return sorted(os.environ)


def _bearer_guard(app: Any, token: str) -> Any:
    expected = f"Bearer {token}".encode()

    async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != expected:
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"unauthorized"})
            return
        await app(scope, receive, send)

    return guarded


def serve_http(server: TestServer) -> None:
    import uvicorn

    app: Any = server.streamable_http_app(host="127.0.0.1")
    if os.environ.get("MCP_TEST_TOKEN"):
        app = _bearer_guard(app, os.environ["MCP_TEST_TOKEN"])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)  # the fixture reads the port from here
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
    uvicorn.Server(config).run(sockets=[sock])


def main(argv: list[str]) -> None:
    transport = argv[0] if argv else "stdio"
    server = TestServer(hostile="--hostile" in argv)
    if transport == "stdio":
        server.run("stdio")
    elif transport == "http":
        serve_http(server)
    else:
        raise SystemExit(f"unknown transport {transport!r}: stdio or http")


if __name__ == "__main__":
    time.sleep(float(os.environ.get("MCP_TEST_START_DELAY", "0")))
    main(sys.argv[1:])
