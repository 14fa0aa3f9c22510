"""The tool registry and the built-in tools.

A tool is a name, a description, a JSON schema for its arguments, an `irreversible` flag and
an async `run(ctx, arguments)`. The registry validates arguments against the schema before
anything runs; a tool failure or invalid arguments become an error message for the model,
never an exception out of the agent loop.

Names: tools are named with dots (`files.read`), but OpenAI function names must match
`^[a-zA-Z0-9_-]{1,64}$`, so the model sees `wire_name` (dots -> underscores: `files_read`).
`ToolRegistry.get` accepts either form.

Adding a tool: write `async def my_tool(ctx: ToolContext, args: dict) -> Any` (raise
`ToolError` for a failure the model should read) and register it:
    registry.register(Tool("my.tool", "What it does.", {...JSON schema...}, my_tool))
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema

from serve_app.agent import workspace_fs as wfs
from serve_app.agent.config import AgentSettings
from serve_app.agent.sandbox import Sandbox, SandboxUnavailable, WorkspaceQuotaExceeded

_WIRE_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_VALIDATOR = jsonschema.Draft202012Validator

RetrieveFn = Callable[[str, int], Awaitable[list[dict[str, Any]]]]
# What the runner is given: (query, top_k, session owner, session metadata) -> passages.
SessionRetrieveFn = Callable[[str, int, str | None, dict[str, Any]],
                             Awaitable[list[dict[str, Any]]]]


class ToolError(Exception):
    """A failure the model should read (never a stack trace)."""


@dataclass
class ToolContext:
    session_id: str
    workspace: "Workspace"
    settings: AgentSettings
    sandbox: Sandbox
    time_left_s: float
    retrieve: RetrieveFn | None = None
    http_transport: Any = None  # httpx transport override (tests); None: the network
    # True only when a human approved this very call: irreversible effects need it.
    confirmed: bool = False


ToolFn = Callable[[ToolContext, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    run: ToolFn
    irreversible: bool = False
    # Arguments that make an otherwise reversible call irreversible (python write=true).
    irreversible_if: Callable[[dict[str, Any]], bool] | None = None
    # Why a call waits for a human, as the pending confirmation shows it (default: the
    # runner's own wording).
    confirmation_reason: str | None = None

    def needs_confirmation(self, arguments: Any) -> bool:
        if self.irreversible:
            return True
        return bool(self.irreversible_if and isinstance(arguments, dict)
                    and self.irreversible_if(arguments))

    @property
    def wire_name(self) -> str:
        return self.name.replace(".", "_")

    def openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {
            "name": self.wire_name, "description": self.description,
            "parameters": self.parameters}}


@dataclass
class ToolOutcome:
    result: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def summary(self, limit: int = 2000) -> str:
        text = json.dumps(self.result, ensure_ascii=False, default=str)
        return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class ToolRegistry:
    _tools: dict[str, Tool] = field(default_factory=dict)

    def register(self, tool: Tool) -> Tool:
        if not _WIRE_NAME.match(tool.wire_name):
            raise ValueError(f"tool name {tool.name!r}: with dots as underscores it must "
                             "match ^[a-zA-Z0-9_-]{1,64}$")
        if any(t.wire_name == tool.wire_name for t in self._tools.values()):
            raise ValueError(f"a tool named {tool.wire_name!r} is already registered")
        _VALIDATOR.check_schema(tool.parameters)
        if tool.parameters.get("type") != "object":
            raise ValueError(f"tool {tool.name!r}: parameters must be an object schema")
        self._tools[tool.name] = tool
        return tool

    def get(self, name: str) -> Tool | None:
        if name in self._tools:
            return self._tools[name]
        return next((t for t in self._tools.values() if t.wire_name == name), None)

    def names(self) -> list[str]:
        return list(self._tools)

    def openai_tools(self, names: list[str]) -> list[dict[str, Any]]:
        return [self._tools[name].openai() for name in names if name in self._tools]

    @staticmethod
    def validate(tool: Tool, arguments: Any) -> str | None:
        """None when the arguments fit the tool's schema, else a message for the model."""
        errors = sorted(_VALIDATOR(tool.parameters).iter_errors(arguments),
                        key=lambda e: list(e.absolute_path))
        if not errors:
            return None
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "arguments"
        return f"invalid arguments for {tool.wire_name} at {where}: {first.message}"

    async def run(self, tool: Tool, ctx: ToolContext, arguments: dict[str, Any]) -> ToolOutcome:
        if tool.needs_confirmation(arguments) and not ctx.confirmed:
            # The runner pauses such calls for a human; this is the second lock.
            return ToolOutcome(error=f"{tool.wire_name} with these arguments needs a "
                               "human's confirmation; it was not executed")
        try:
            result = await tool.run(ctx, arguments)
        except ToolError as error:
            return ToolOutcome(error=str(error))
        except SandboxUnavailable as error:
            return ToolOutcome(error=f"the sandbox is unavailable: {error}")
        except (WorkspaceQuotaExceeded, wfs.QuotaExceeded) as error:
            return ToolOutcome(error=f"disk quota exceeded: {error}")
        except wfs.FileOpTimeout as error:
            return ToolOutcome(error=f"{tool.wire_name} timed out: {error}")
        except wfs.NotRegularFile:
            return ToolOutcome(error=f"{tool.wire_name}: only regular files and "
                               "directories are allowed")
        except Exception as error:  # a tool bug must not end the session with a trace
            return ToolOutcome(error=f"{tool.wire_name} failed: {type(error).__name__}: {error}")
        if isinstance(result, ToolOutcome):
            return result
        return ToolOutcome(result=result)


# ----------------------------------------------------------------------------- workspace
class Workspace:
    """A session's directory; every path is resolved (symlinks too) and must stay inside.
    Files belong to the service: sandboxed runs see the directory read-only or through a
    copy (sandbox.py), never as its owner."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, relative: str) -> Path:
        if "\x00" in relative:
            raise ToolError("path contains a NUL byte")
        text = relative.strip() or "."
        if text == "/workspace" or text.startswith("/workspace/"):
            text = text[len("/workspace"):].lstrip("/") or "."
        if text.startswith("/") or text.startswith("~"):
            raise ToolError(f"{relative!r}: use a path relative to the workspace")
        root = self.root.resolve()
        target = (root / text).resolve()
        if target != root and not target.is_relative_to(root):
            raise ToolError(f"{relative!r} is outside the workspace")
        return target

    def display(self, path: Path) -> str:
        relative = path.relative_to(self.root.resolve())
        return str(relative) if str(relative) != "." else "."

    def remove_all(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# ----------------------------------------------------------------------------- tools
async def run_python(ctx: ToolContext, args: dict[str, Any]) -> ToolOutcome:
    write = bool(args.get("write_workspace"))
    result = await ctx.sandbox.run_python(args["code"], ctx.workspace.root, ctx.session_id,
                                          wall_seconds=ctx.time_left_s,
                                          write=write and ctx.confirmed)
    data = result.as_dict()
    if result.ok:
        return ToolOutcome(result=data)
    reason = (result.error or (f"killed: {result.killed}" if result.killed
                               else f"exit code {result.exit_code}"))
    return ToolOutcome(result=data, error=f"the program failed ({reason})")


def _io(ctx: ToolContext, fn: Any) -> Any:
    """File I/O off the event loop, with the configured timeout."""
    return wfs.run_blocking(fn, ctx.settings.file_op_timeout_s)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except FileNotFoundError:
        return None


async def files_read(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    path = ctx.workspace.path(args["path"])
    limit = min(args.get("max_bytes") or ctx.settings.max_file_bytes,
                ctx.settings.max_file_bytes)
    try:
        data = await _io(ctx, lambda: wfs.read_regular(path, limit))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, wfs.NotRegularFile) \
            as exc:
        raise ToolError(f"{args['path']!r} is not a file in the workspace") from exc
    return {"path": ctx.workspace.display(path),
            "content": data[:limit].decode("utf-8", errors="replace"),
            "truncated": len(data) > limit}


async def files_list(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    path = ctx.workspace.path(args.get("path") or ".")
    info = await _io(ctx, lambda: _stat(path))
    if info is None or wfs.kind(info.st_mode) != "dir":
        raise ToolError(f"{args.get('path')!r} is not a directory in the workspace")
    listing = await _io(ctx, lambda: wfs.list_dir(path, ctx.settings.max_list_entries))
    result: dict[str, Any] = {"path": ctx.workspace.display(path), "entries": listing.entries}
    if listing.truncated:
        result["truncated"] = True
    return result


async def files_write(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    path = ctx.workspace.path(args["path"])
    data = args["content"].encode()
    if len(data) > ctx.settings.max_file_bytes:
        raise ToolError(f"content is {len(data)} bytes; the limit is "
                        f"{ctx.settings.max_file_bytes}")
    if path == ctx.workspace.root.resolve():
        raise ToolError(f"{args['path']!r} is a directory")
    root = ctx.workspace.root.resolve()
    quota = ctx.sandbox.quota_bytes

    def write() -> None:
        info = _stat(path)
        if info is not None and wfs.kind(info.st_mode) != "file":
            raise ToolError(f"{args['path']!r} is not a regular file")
        usage = ctx.sandbox.usage(root)
        replaced = 0 if info is None or args.get("append") else info.st_size
        new_dirs = []
        parent = path.parent
        while not parent.exists():
            new_dirs.append(parent)
            parent = parent.parent
        if usage.over or usage.entries + len(new_dirs) + (info is None) \
                > ctx.sandbox.settings.workspace_max_entries:
            raise wfs.QuotaExceeded("the workspace holds too many files")
        if usage.bytes - replaced + len(data) > quota:
            raise wfs.QuotaExceeded(f"writing {len(data)} bytes would pass the session's "
                                    f"workspace quota of {quota // (1024 * 1024)} MB")
        for directory in reversed(new_dirs):
            directory.mkdir(mode=0o755)
        wfs.write_regular(path, data, append=bool(args.get("append")))

    await _io(ctx, write)
    return {"path": ctx.workspace.display(path), "bytes_written": len(data)}


async def files_delete(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    path = ctx.workspace.path(args["path"])
    if path == ctx.workspace.root.resolve():
        raise ToolError("the workspace itself cannot be deleted")

    def delete() -> None:
        info = _stat(path)
        if info is None:
            raise ToolError(f"{args['path']!r} does not exist")
        if wfs.kind(info.st_mode) == "dir":
            if not args.get("recursive"):
                raise ToolError(f"{args['path']!r} is a directory; pass recursive=true")
            shutil.rmtree(path)
        else:  # files, and FIFOs or sockets left behind: unlink never opens them
            path.unlink()

    await _io(ctx, delete)
    return {"path": args["path"], "deleted": True}


def host_allowed(url: str, allowlist: list[str]) -> tuple[bool, str]:
    """(allowed, reason). Entries: 'host', '*.domain' (subdomains only), 'host:port'."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return False, "only http and https URLs are allowed"
    if parts.username or parts.password:
        return False, "URLs with credentials are not allowed"
    host = (parts.hostname or "").lower()
    if not host:
        return False, "the URL has no host"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for entry in allowlist:
        name, _, entry_port = entry.partition(":")
        if entry_port and int(entry_port) != port:
            continue
        if name == host or (name.startswith("*.") and host.endswith(name[1:])):
            return True, ""
    return False, f"host {host!r} (port {port}) is not on the allowlist"


async def _http(ctx: ToolContext, method: str, args: dict[str, Any],
                allowlist: list[str]) -> dict[str, Any]:
    import httpx

    allowed, reason = host_allowed(args["url"], allowlist)
    if not allowed:
        raise ToolError(reason)
    timeout = max(0.1, min(ctx.settings.http_timeout_s, ctx.time_left_s))
    body: dict[str, Any] = {}
    if "json" in args:
        body["json"] = args["json"]
    elif "body" in args:
        body["content"] = args["body"].encode()
    # No redirects (a redirect could leave the allowlist) and no proxies from the environment.
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False,
                                 transport=ctx.http_transport) as client:
        try:
            async with client.stream(method, args["url"], headers=args.get("headers") or {},
                                     **body) as response:
                limit = ctx.settings.http_max_response_bytes
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > limit:
                        break
        except httpx.HTTPError as error:
            raise ToolError(f"{method} {args['url']} failed: {type(error).__name__}") from error
    data = b"".join(chunks)
    result = {"status": response.status_code,
              "content_type": response.headers.get("content-type"),
              "body": data[:limit].decode("utf-8", errors="replace"),
              "truncated": size > limit}
    if response.is_redirect:
        result["location"] = response.headers.get("location")
    return result


async def http_get(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    return await _http(ctx, "GET", args, ctx.settings.http_get_allowlist)


async def http_post(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    return await _http(ctx, "POST", args, ctx.settings.http_post_allowlist)


async def retrieve(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    if ctx.retrieve is None:
        raise ToolError("retrieval is not configured on this server")
    hits = await ctx.retrieve(args["query"], int(args.get("top_k") or 5))
    return {"query": args["query"], "results": hits}


_PATH = {"type": "string", "minLength": 1, "maxLength": 512,
         "description": "Path relative to the workspace (also seen by python as "
         "/workspace/<path>)."}
_HEADERS = {"type": "object", "additionalProperties": {"type": "string"}, "maxProperties": 20}


def default_registry() -> ToolRegistry:
    registry = ToolRegistry()
    registry.register(Tool(
        "python", "Run Python 3 code (standard library only) in an isolated sandbox without "
        "network; the working directory is the session workspace, READ-ONLY unless "
        "write_workspace is true (that needs a human's approval). /tmp is scratch space. "
        "Returns exit code, stdout and stderr.",
        {"type": "object", "properties": {
            "code": {"type": "string", "minLength": 1, "maxLength": 100_000},
            "write_workspace": {"type": "boolean", "description": "Keep the files the "
                                "code writes in /workspace (needs approval)."}},
         "required": ["code"], "additionalProperties": False}, run_python,
        irreversible_if=lambda args: bool(args.get("write_workspace"))))
    registry.register(Tool(
        "files.read", "Read a text file from the session workspace.",
        {"type": "object", "properties": {"path": _PATH, "max_bytes": {
            "type": "integer", "minimum": 1}},
         "required": ["path"], "additionalProperties": False}, files_read))
    registry.register(Tool(
        "files.list", "List a directory of the session workspace.",
        {"type": "object", "properties": {"path": _PATH}, "additionalProperties": False},
        files_list))
    registry.register(Tool(
        "files.write", "Write (or append to) a text file in the session workspace.",
        {"type": "object", "properties": {"path": _PATH, "content": {"type": "string"},
                                          "append": {"type": "boolean"}},
         "required": ["path", "content"], "additionalProperties": False},
        files_write, irreversible=True))
    registry.register(Tool(
        "files.delete", "Delete a file (or, with recursive=true, a directory) in the "
        "session workspace.",
        {"type": "object", "properties": {"path": _PATH, "recursive": {"type": "boolean"}},
         "required": ["path"], "additionalProperties": False},
        files_delete, irreversible=True))
    registry.register(Tool(
        "http.get", "HTTP GET a URL on an allowlisted host. Returns status and body.",
        {"type": "object", "properties": {
            "url": {"type": "string", "minLength": 1, "maxLength": 2048},
            "headers": _HEADERS},
         "required": ["url"], "additionalProperties": False}, http_get))
    registry.register(Tool(
        "http.post", "HTTP POST to a URL on an allowlisted host (JSON or text body).",
        {"type": "object", "properties": {
            "url": {"type": "string", "minLength": 1, "maxLength": 2048},
            "json": {}, "body": {"type": "string"}, "headers": _HEADERS},
         "required": ["url"], "additionalProperties": False}, http_post, irreversible=True))
    registry.register(Tool(
        "retrieve", "Search the document collection; returns the best matching passages "
        "with their source ids.",
        {"type": "object", "properties": {
            "query": {"type": "string", "minLength": 1, "maxLength": 2000},
            "top_k": {"type": "integer", "minimum": 1, "maximum": 20}},
         "required": ["query"], "additionalProperties": False}, retrieve))
    return registry
