"""Tools from MCP servers (plain asyncio, no Ray), through the official `mcp` SDK.

`McpToolbox` connects to the servers of `agent.mcp_servers` (stdio: a child process; http:
streamable HTTP), lists each server's tools once per replica, checks every tool and
registers what passes in the agent's `ToolRegistry` as an ordinary `Tool` named
`mcp__<server>__<tool>`. From there an MCP tool follows every rule of the built-in tools,
in the same code (runner.py): the session's tool list, budgets, the loop detector, audit
rows with arguments, the registry's argument validation, and human confirmation, which an
MCP tool needs unless its server declares it `readOnlyHint: true` and not
`destructiveHint: true` (`confirm: always` makes a server's every tool need it).

Servers are hostile input. A tool is dropped (and logged) when its name is not an
OpenAI function name once namespaced (`^[a-zA-Z0-9_-]{1,64}$`), its schema is not a
valid, self-contained JSON Schema object within `max_schema_bytes` (serve_app/
json_schemas.py), or it holds unpaired surrogates; descriptions are cut; at most
`max_tools` per server are taken. A listing the SDK refuses as a whole (not MCP) leaves
that server without tools. A result keeps at most `max_result_chars` of text (images and
audio become a note), and an error, a timeout, a crash or a closed connection becomes an
error result for the model, never an exception out of the loop.

Connections: one per server and replica, shared by its sessions, held by a background
task (the SDK's context managers must be left by the task that entered them). The SDK is
imported when a server is first used: this package is imported wherever settings are,
and the SDK costs about a second of CPU. Each call
first pings the server; a dead connection is reopened before the call, so a crashed
stdio server is restarted by the next call. A call whose connection dies under it has an
unknown outcome and is reported so (never retried). After a failed connect the server
answers "unavailable" at once for `retry_after_s`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from serve_app.agent.config import McpHttpServer, McpServerSettings, McpStdioServer
from serve_app.agent.tools import Tool, ToolContext, ToolError, ToolRegistry
from serve_app.json_schemas import check_client_schema, reject_unpaired_surrogates

logger = logging.getLogger(__name__)

PREFIX = "mcp__"
SEPARATOR = "__"
_MAX_PAGES = 20  # tools/list pages read from one server (a cursor that never ends)
_WIRE_LIMIT = 64  # OpenAI function names: ^[a-zA-Z0-9_-]{1,64}$
_CLOSE_WAIT_S = 10.0
# httpx read timeout: the server may hold its event stream open (the SDK's default); calls
# have their own, shorter timeout.
_HTTP_READ_TIMEOUT_S = 300.0
CLIENT_NAME = "llm-production-stack-agent"


class McpUnavailable(Exception):
    """The server could not be reached (connect, initialize, ping or listing failed)."""


def tool_name(server: str, tool: str) -> str:
    """The registry name of a server's tool (dots become '_' on the wire, as for
    built-in tools)."""
    return f"{PREFIX}{server}{SEPARATOR}{tool}"


def server_of(name: str) -> str | None:
    """The server a session's tool name refers to (`mcp__<server>` or
    `mcp__<server>__<tool>`), or None for a non-MCP name."""
    if not isinstance(name, str) or not name.startswith(PREFIX):
        return None
    return name[len(PREFIX):].split(SEPARATOR, 1)[0] or None


def confirmation(annotations: Any, policy: str, server: str) -> str | None:
    """Why a call of this tool needs a human, or None when it may run on its own: only a
    tool the server declares read-only (readOnlyHint true) and not destructive."""
    if policy == "always":
        return f"MCP server {server} is configured to confirm every call"
    read_only = getattr(annotations, "read_only_hint", None) is True
    destructive = getattr(annotations, "destructive_hint", None) is True
    if destructive:
        return f"MCP server {server} declares this tool destructive"
    if not read_only:
        return f"MCP server {server} does not declare this tool read-only"
    return None


@dataclass(frozen=True)
class CheckedTool:
    """An MCP tool that passed every check: what the registry gets."""

    server: str
    remote_name: str
    name: str
    description: str
    parameters: dict[str, Any]
    confirmation_reason: str | None


def check_tool(server: McpServerSettings, tool: Any) -> CheckedTool:
    """ValueError (its message says why) unless the listed tool may be offered."""
    remote = tool.name
    if not isinstance(remote, str) or not remote:
        raise ValueError("no name")
    if server.tools is not None and remote not in server.tools:
        raise ValueError("not on the server's allowlist")
    name = tool_name(server.name, remote)
    wire = name.replace(".", "_")
    if len(wire) > _WIRE_LIMIT or not all(c.isascii() and (c.isalnum() or c in "_-")
                                          for c in wire):
        raise ValueError(f"{name!r} is not an OpenAI function name (letters, digits, "
                         f"'_', '-', '.'; at most {_WIRE_LIMIT} characters with the prefix)")
    description = tool.description or getattr(tool, "title", None) or ""
    reject_unpaired_surrogates([description, tool.input_schema, tool.output_schema])
    if len(description) > server.max_description_chars:
        description = description[:server.max_description_chars] + " [cut]"
    for what, schema in (("input", tool.input_schema), ("output", tool.output_schema)):
        if schema is None and what == "output":
            continue
        size = len(json.dumps(schema, ensure_ascii=False, default=str))
        if size > server.max_schema_bytes:
            raise ValueError(f"its {what} schema has {size} bytes; at most "
                             f"{server.max_schema_bytes}")
        try:
            check_client_schema(schema)
        except ValueError as error:
            raise ValueError(f"its {what} schema: {error}") from None
    if tool.input_schema.get("type") != "object":
        raise ValueError("its input schema is not of type object")
    return CheckedTool(server=server.name, remote_name=remote, name=name,
                       description=description, parameters=tool.input_schema,
                       confirmation_reason=confirmation(tool.annotations, server.confirm,
                                                        server.name))


def result_payload(result: Any, limit: int) -> dict[str, Any]:
    """A CallToolResult as the model sees it: its text content (cut to `limit`
    characters; other content kinds become a short note), and the structured content
    only when there is no text (servers mirror one in the other)."""
    parts: list[str] = []
    for block in result.content or []:
        kind = getattr(block, "type", None)
        if kind == "text":
            parts.append(block.text)
        elif kind in ("image", "audio"):
            parts.append(f"[{kind} {block.mime_type}: {len(block.data)} base64 characters "
                         "not shown]")
        elif kind == "resource_link":
            parts.append(f"[resource link {str(block.uri)[:500]}]")
        elif kind == "resource":
            text = getattr(block.resource, "text", None)
            parts.append(text if isinstance(text, str) else
                         f"[resource {str(block.resource.uri)[:500]}: binary, not shown]")
        else:
            parts.append(f"[{str(kind)[:40]} content not shown]")
        if sum(len(p) for p in parts) > limit:
            break
    text = _clean("\n".join(parts))
    payload: dict[str, Any] = {"text": _cut(text, limit)}
    if not text and result.structured_content is not None:
        try:
            dumped = _clean(json.dumps(result.structured_content, ensure_ascii=False))
            payload["structured_content"] = (json.loads(dumped) if len(dumped) <= limit
                                             else _cut(dumped, limit))
        except (TypeError, ValueError, RecursionError):
            payload["structured_content"] = "[structured content not shown: not JSON]"
    return payload


def _clean(text: str) -> str:
    """Unpaired surrogates (JSON may escape them) become U+FFFD: they are not text and
    every store downstream would refuse them."""
    return text if text.isascii() else text.encode("utf-8", "replace").decode("utf-8")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f" [cut: {len(text) - limit} " \
        "more characters]"


def describe(error: BaseException) -> str:
    """One line about a failure: the first leaf of exception groups, message cut."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    message = " ".join(str(error).split())[:300]
    if isinstance(error, McpUnavailable):
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


# ----------------------------------------------------------------------------- connection
class _Connection:
    """One server's client session, owned by a background task."""

    def __init__(self, server: McpServerSettings, environ: Mapping[str, str],
                 monotonic: Callable[[], float]) -> None:
        self.server = server
        self.environ = environ
        self.monotonic = monotonic
        self.session: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self._lock = asyncio.Lock()
        self.failed_at: float | None = None
        self.last_error: str | None = None

    async def get(self, timeout: float) -> tuple[Any, bool]:
        """(a live session, whether it was opened just now). Raises McpUnavailable."""
        async with self._lock:
            if self.session is not None and self._task is not None and not self._task.done():
                return self.session, False
            await self._close()
            if self.failed_at is not None \
                    and self.monotonic() - self.failed_at < self.server.retry_after_s:
                raise McpUnavailable(f"{self.last_error} (next try within "
                                     f"{self.server.retry_after_s:g}s of that failure)")
            try:
                self.session = await self._open(min(timeout, self.server.connect_timeout_s))
            except McpUnavailable as error:
                self.failed_at, self.last_error = self.monotonic(), str(error)
                logger.warning("MCP server %s unavailable: %s", self.server.name, error)
                raise
            self.failed_at = self.last_error = None
            return self.session, True

    async def reset(self, session: Any) -> None:
        """Drop the connection `session` belongs to (dead or hung); the next call opens a
        new one (a stdio server process is stopped and started again)."""
        async with self._lock:
            if self.session is session:
                await self._close()

    async def close(self) -> None:
        async with self._lock:
            await self._close()

    async def _open(self, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[Any] = loop.create_future()
        # After a timeout nobody awaits `ready` any more; its late failure is read here so
        # asyncio does not log "exception was never retrieved".
        ready.add_done_callback(lambda done: done.cancelled() or done.exception())
        stop = asyncio.Event()
        task = asyncio.create_task(self._hold(ready, stop), name=f"mcp-{self.server.name}")
        try:
            session = await asyncio.wait_for(asyncio.shield(ready), timeout)
        except asyncio.TimeoutError:
            await _finish(task, stop, cancel=True)
            raise McpUnavailable(f"no answer to initialize within {timeout:g}s") from None
        except BaseException:
            await _finish(task, stop, cancel=True)
            raise
        self._task, self._stop = task, stop
        return session

    async def _close(self) -> None:
        task, stop = self._task, self._stop
        self.session = self._task = self._stop = None
        if task is not None and stop is not None:
            await _finish(task, stop)

    async def _hold(self, ready: asyncio.Future[Any], stop: asyncio.Event) -> None:
        from mcp import ClientSession
        from mcp.types import Implementation

        try:
            async with AsyncExitStack() as stack:
                read, write = await self._transport(stack)
                session = await stack.enter_async_context(ClientSession(
                    read, write, read_timeout_seconds=self.server.connect_timeout_s,
                    client_info=Implementation(name=CLIENT_NAME, version="1")))
                await session.initialize()
                if not ready.done():
                    ready.set_result(session)
                await stop.wait()
        except asyncio.CancelledError:
            if not ready.done():
                ready.set_exception(McpUnavailable("connection cancelled"))
            raise
        except Exception as error:  # reported, never raised into the agent loop
            if not ready.done():
                ready.set_exception(McpUnavailable(describe(error)))
            else:
                logger.warning("MCP server %s: connection lost: %s", self.server.name,
                               describe(error))
        finally:
            if not ready.done():
                ready.set_exception(McpUnavailable("connection closed"))

    async def _transport(self, stack: AsyncExitStack) -> tuple[Any, Any]:
        server = self.server
        if isinstance(server, McpStdioServer):
            from mcp import StdioServerParameters, stdio_client

            env = {var: self._secret(source, f"env {var}")
                   for var, source in server.env.items()}
            params = StdioServerParameters(command=server.command, args=list(server.args),
                                           env=env or None, cwd=server.cwd)
            try:
                return await stack.enter_async_context(stdio_client(params, errlog=_errlog()))
            except OSError as error:
                raise McpUnavailable(f"cannot start {server.command!r}: "
                                     f"{error.strerror or error}") from None
        assert isinstance(server, McpHttpServer)
        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        headers = {header: self._secret(source, f"header {header}")
                   for header, source in server.headers_env.items()}
        # No proxies from the environment; the SDK follows only same-origin redirects.
        client = await stack.enter_async_context(httpx2.AsyncClient(
            headers=headers, trust_env=False, follow_redirects=False,
            timeout=httpx2.Timeout(server.connect_timeout_s,
                                   read=_HTTP_READ_TIMEOUT_S)))
        return await stack.enter_async_context(
            streamable_http_client(server.url, http_client=client))

    def _secret(self, source: str, what: str) -> str:
        value = self.environ.get(source)
        if value is None:
            raise McpUnavailable(f"{what}: environment variable {source} is not set")
        return value


async def _finish(task: asyncio.Task[None], stop: asyncio.Event, *,
                  cancel: bool = False) -> None:
    """Ask the holder to leave its contexts (at once with `cancel`); cancel it if it does
    not in time. The SDK's exits are bounded (a stdio server gets stdin closed, then
    SIGTERM, then SIGKILL)."""
    stop.set()
    if not cancel:
        done, _ = await asyncio.wait({task}, timeout=_CLOSE_WAIT_S)
        if done:
            return
    task.cancel()
    await asyncio.wait({task}, timeout=_CLOSE_WAIT_S)


_DEVNULL: Any = None


def _errlog() -> Any:
    """Where a stdio server's stderr goes: ours when it is a real file, else nowhere."""
    global _DEVNULL
    try:
        sys.stderr.fileno()
        return sys.stderr
    except (AttributeError, OSError, ValueError):
        if _DEVNULL is None:
            _DEVNULL = open(os.devnull, "w")  # noqa: SIM115 - kept for every child
        return _DEVNULL


# ----------------------------------------------------------------------------- toolbox
@dataclass
class _ServerState:
    settings: McpServerSettings
    connection: _Connection
    names: list[str] | None = None  # registered tool names, once listed
    dropped: list[dict[str, str]] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class McpToolbox:
    """The configured MCP servers, their tools in `registry`, and the calls to them."""

    def __init__(self, servers: Iterable[McpServerSettings], registry: ToolRegistry, *,
                 environ: Mapping[str, str] | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        env = environ if environ is not None else os.environ
        self.servers = {s.name: _ServerState(s, _Connection(s, env, monotonic))
                        for s in servers}

    # ------------------------------------------------------------------ discovery
    async def ensure(self, names: Iterable[str], *, defaults: bool = False) -> None:
        """List (once) the servers that these session tool names refer to, and with
        `defaults` those whose tools are in the default tools. Never raises: a server
        that cannot be listed now just has no tools yet."""
        wanted = {server_of(n) for n in names} & set(self.servers)
        if defaults:
            wanted |= {n for n, st in self.servers.items() if st.settings.in_default_tools}
        if wanted:
            await asyncio.gather(*(self._list(self.servers[n]) for n in sorted(wanted)))

    def expand(self, names: list[str], *, defaults: bool = False) -> list[str]:
        """Session tool names with `mcp__<server>` replaced by that server's tools (and
        the default servers' tools appended when `defaults`)."""
        out: list[str] = []
        for name in names:
            state = None
            if isinstance(name, str) and name.startswith(PREFIX):
                state = self.servers.get(name[len(PREFIX):])
            if state is None or state.names is None:
                out.append(name)  # unknown, or a server not listed: _tool_names says so
            else:  # the whole server: its tools
                out.extend(state.names)
        if defaults:
            for state in self.servers.values():
                if state.settings.in_default_tools:
                    out.extend(state.names or [])
        return out

    def unavailable(self, name: str) -> str | None:
        """Why a tool name of a configured server has no tool (None: not such a name,
        or the server is listed and simply has no tool of that name)."""
        state = self.servers.get(server_of(name) or "")
        if state is None or state.names is not None:
            return None
        return state.connection.last_error or "not reachable yet"

    def status(self) -> list[dict[str, Any]]:
        """Per server: listed tools, dropped tools and why, the last connect error."""
        return [{"name": name, "transport": st.settings.transport, "tools": st.names,
                 "dropped": list(st.dropped), "error": st.connection.last_error}
                for name, st in self.servers.items()]

    async def _list(self, state: _ServerState) -> None:
        async with state.lock:
            if state.names is not None:
                return
            server = state.settings
            session = None
            try:
                session, _ = await state.connection.get(server.connect_timeout_s)
                listed = await asyncio.wait_for(self._list_all(session),
                                                server.connect_timeout_s * _MAX_PAGES)
            except McpUnavailable:
                return  # logged by the connection, retried after retry_after_s
            except Exception as error:  # a listing the SDK refuses, a timeout, a crash
                message = describe(error)
                logger.warning("MCP server %s: listing its tools failed: %s", server.name,
                               message)
                state.connection.failed_at = state.connection.monotonic()
                state.connection.last_error = f"listing tools failed: {message}"
                await state.connection.reset(session)
                return
            state.names, state.dropped = self._register(state, listed)

    @staticmethod
    async def _list_all(session: Any) -> list[Any]:
        from mcp.types import PaginatedRequestParams

        tools: list[Any] = []
        cursor = None
        for _ in range(_MAX_PAGES):
            page = await session.list_tools(
                params=PaginatedRequestParams(cursor=cursor) if cursor else None)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        return tools

    def _register(self, state: _ServerState,
                  listed: list[Any]) -> tuple[list[str], list[dict[str, str]]]:
        server = state.settings
        names: list[str] = []
        dropped: list[dict[str, str]] = []
        for tool in listed:
            shown = repr(str(tool.name)[:80])
            if server.tools is not None and tool.name not in server.tools:
                continue  # not wanted: not a fault of the server
            if len(names) >= server.max_tools:
                dropped.append({"tool": shown, "reason": f"more than max_tools "
                                f"({server.max_tools})"})
                continue
            try:
                checked = check_tool(server, tool)
                self.registry.register(self._tool(state, checked))
            except Exception as error:  # noqa: BLE001 - a hostile tool is dropped, not fatal
                dropped.append({"tool": shown, "reason": describe(error)
                                if not isinstance(error, ValueError) else str(error)[:300]})
                continue
            names.append(checked.name)
        for item in dropped:
            logger.warning("MCP server %s: tool %s dropped: %s", server.name, item["tool"],
                           item["reason"])
        logger.info("MCP server %s: %d tools (%d dropped)", server.name, len(names),
                    len(dropped))
        return names, dropped

    def _tool(self, state: _ServerState, checked: CheckedTool) -> Tool:
        async def run(ctx: ToolContext, arguments: dict[str, Any]) -> dict[str, Any]:
            return await self.call(state, checked, arguments, ctx.time_left_s)

        return Tool(checked.name, checked.description, checked.parameters, run,
                    irreversible=checked.confirmation_reason is not None,
                    confirmation_reason=checked.confirmation_reason)

    # ------------------------------------------------------------------ calls
    async def call(self, state: _ServerState, tool: CheckedTool, arguments: dict[str, Any],
                   time_left_s: float) -> dict[str, Any]:
        """Call the tool; every failure is a ToolError with a message for the model."""
        from mcp.shared.exceptions import MCPError
        from mcp.types import CONNECTION_CLOSED, REQUEST_TIMEOUT

        server = state.settings
        timeout = max(0.1, min(server.call_timeout_s, time_left_s))
        deadline = time.monotonic() + timeout
        session = await self._live_session(state, timeout)
        left = max(0.1, deadline - time.monotonic())
        try:
            # The SDK's own timeout answers first; ours is for a transport that hangs.
            result = await asyncio.wait_for(
                session.call_tool(tool.remote_name, arguments, read_timeout_seconds=left),
                left + 1.0)
        except MCPError as error:
            if error.code == REQUEST_TIMEOUT:
                raise ToolError(f"MCP server {server.name} did not answer within "
                                f"{timeout:g}s") from None
            if error.code == CONNECTION_CLOSED:
                await state.connection.reset(session)
                raise ToolError(f"MCP server {server.name} closed the connection during "
                                "the call (it may have crashed); the outcome is unknown")\
                    from None
            raise ToolError(f"MCP server {server.name} answered with an error: "
                            f"{_clean(error.message)[:500]}") from None
        except asyncio.TimeoutError:
            await state.connection.reset(session)
            raise ToolError(f"MCP server {server.name} did not answer within "
                            f"{timeout:g}s") from None
        except Exception as error:  # an invalid result, a transport failure
            raise ToolError(f"MCP server {server.name}: the call failed "
                            f"({_clean(describe(error))})") from None
        if getattr(result, "is_error", False):
            text = result_payload(result, min(server.max_result_chars, 2000))["text"]
            raise ToolError(f"{tool.name} failed: {text or 'the MCP server reported an error'}")
        return result_payload(result, server.max_result_chars)

    async def _live_session(self, state: _ServerState, timeout: float) -> Any:
        """The server's session after a ping: a dead connection is replaced first."""
        from mcp.shared.exceptions import MCPError

        server = state.settings
        for attempt in range(2):
            try:
                session, fresh = await state.connection.get(timeout)
            except McpUnavailable as error:
                raise ToolError(f"MCP server {server.name} is unavailable: {error}") from None
            if fresh:
                return session
            try:
                await asyncio.wait_for(session.send_ping(),
                                       min(timeout, server.connect_timeout_s))
                return session
            except Exception as error:  # closed (crashed), hung, or a broken transport
                await state.connection.reset(session)
                if attempt or not isinstance(error, MCPError):
                    raise ToolError(f"MCP server {server.name} is not answering "
                                    f"({describe(error)}); try again later") from None
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await asyncio.gather(*(st.connection.close() for st in self.servers.values()),
                             return_exceptions=True)
