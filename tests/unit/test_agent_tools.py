"""Tool registry, argument validation, workspace confinement, host allowlists."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from serve_app.agent.sandbox import Sandbox
from serve_app.agent.tools import (Tool, ToolContext, ToolError, ToolRegistry, Workspace,
                                   default_registry, host_allowed)
from tests.support.agent_env import settings


def context(tmp_path: Path, confirmed: bool = True, **overrides) -> ToolContext:
    """A tool context; confirmed=True: as if a human approved the call (the runner's
    pause for irreversible calls is tested in test_agent_confirmation.py)."""
    agent_settings = settings(**overrides)
    root = tmp_path / "ws"
    root.mkdir(exist_ok=True)
    return ToolContext(session_id="s", workspace=Workspace(root), settings=agent_settings,
                       sandbox=Sandbox(agent_settings.sandbox), time_left_s=30,
                       confirmed=confirmed)


def test_wire_names_are_valid_openai_function_names_and_map_back():
    registry = default_registry()
    for name in registry.names():
        tool = registry.get(name)
        assert re.match(r"^[a-zA-Z0-9_-]{1,64}$", tool.wire_name)
        assert registry.get(tool.wire_name) is tool
    assert registry.get("files_read").name == "files.read"
    assert registry.get("files.write").irreversible and registry.get("http.post").irreversible
    assert not registry.get("python").irreversible and not registry.get("http.get").irreversible


def test_registering_a_tool_is_one_call_and_names_stay_unique():
    registry = ToolRegistry()

    async def echo(ctx, args):
        return args

    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    registry.register(Tool("echo.it", "Echo.", schema, echo))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Tool("echo_it", "Clash.", schema, echo))
    with pytest.raises(ValueError):
        registry.register(Tool("bad name!", "x", schema, echo))
    with pytest.raises(Exception):
        registry.register(Tool("bad.schema", "x", {"type": "object", "properties": 3}, echo))
    assert registry.openai_tools(["echo.it"])[0]["function"]["name"] == "echo_it"


@pytest.mark.parametrize("arguments, fragment", [
    ({}, "'path' is a required property"),
    ({"path": 3}, "is not of type 'string'"),
    ({"path": "a", "extra": 1}, "Additional properties"),
    ("not an object", "is not of type 'object'"),
])
def test_invalid_arguments_become_a_message(arguments, fragment):
    tool = default_registry().get("files.read")
    message = ToolRegistry.validate(tool, arguments)
    assert message is not None and fragment in message
    assert ToolRegistry.validate(tool, {"path": "a.txt"}) is None


@pytest.mark.parametrize("path", ["../x", "a/../../x", "/etc/passwd", "~/x",
                                  "/workspace/../etc/passwd", "..", "a\x00b"])
def test_paths_cannot_leave_the_workspace(tmp_path, path):
    with pytest.raises(ToolError):
        Workspace(tmp_path).path(path)


def test_symlinks_out_of_the_workspace_are_refused(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "link").symlink_to("/etc")
    (root / "file_link").symlink_to("/etc/hostname")
    workspace = Workspace(root)
    for path in ("link/passwd", "file_link", "link"):
        with pytest.raises(ToolError, match="outside the workspace"):
            workspace.path(path)
    assert workspace.path("/workspace/a/b.txt") == (root / "a" / "b.txt").resolve()
    assert workspace.path("./a/../b") == (root / "b").resolve()


async def test_file_tools_round_trip(tmp_path):
    registry = default_registry()
    ctx = context(tmp_path)
    write = await registry.run(registry.get("files.write"), ctx,
                               {"path": "notes/a.txt", "content": "hello"})
    assert write.ok, write.error
    await registry.run(registry.get("files.write"), ctx,
                       {"path": "notes/a.txt", "content": " world", "append": True})
    read = await registry.run(registry.get("files.read"), ctx, {"path": "notes/a.txt"})
    assert read.result["content"] == "hello world"
    listing = await registry.run(registry.get("files.list"), ctx, {"path": "notes"})
    assert listing.result["entries"] == [{"name": "a.txt", "type": "file", "size": 11}]
    gone = await registry.run(registry.get("files.delete"), ctx, {"path": "notes/a.txt"})
    assert gone.ok and not (ctx.workspace.root / "notes" / "a.txt").exists()
    missing = await registry.run(registry.get("files.read"), ctx, {"path": "notes/a.txt"})
    assert not missing.ok and "not a file" in missing.error
    outside = await registry.run(registry.get("files.read"), ctx, {"path": "../../etc/passwd"})
    assert not outside.ok and "outside the workspace" in outside.error


async def test_file_size_limit(tmp_path):
    registry = default_registry()
    ctx = context(tmp_path, max_file_bytes=1024)
    outcome = await registry.run(registry.get("files.write"), ctx,
                                 {"path": "big", "content": "x" * 2000})
    assert not outcome.ok and "limit" in outcome.error
    assert not (ctx.workspace.root / "big").exists()


@pytest.mark.parametrize("url, allowed", [
    ("https://api.example.com/x", True),
    ("https://example.com/x", True),
    ("https://evil.com/?example.com", False),
    ("https://example.com.evil.com/", False),
    ("http://user:pw@example.com/", False),
    ("ftp://example.com/", False),
    ("https://docs.example.org/", True),
    ("https://example.org/", False),
    ("http://127.0.0.1:8080/", True),
    ("http://127.0.0.1:9090/", False),
])
def test_host_allowlist(url, allowed):
    ok, _ = host_allowed(url, ["example.com", "api.example.com", "*.example.org",
                               "127.0.0.1:8080"])
    assert ok is allowed


async def test_http_get_reaches_allowlisted_hosts_only(tmp_path, target):
    registry = default_registry()
    ctx = context(tmp_path, http_get_allowlist=[f"127.0.0.1:{target.port}"])
    outcome = await registry.run(registry.get("http.get"), ctx, {"url": f"{target.url}/hello"})
    assert outcome.ok and outcome.result["status"] == 200 and "/hello" in outcome.result["body"]
    before = len(target.received)
    refused = await registry.run(registry.get("http.get"), ctx,
                                 {"url": f"http://localhost:{target.port}/x"})
    assert not refused.ok and "allowlist" in refused.error
    assert len(target.received) == before


async def test_retrieve_calls_the_injected_search(tmp_path):
    registry = default_registry()
    ctx = context(tmp_path)
    missing = await registry.run(registry.get("retrieve"), ctx, {"query": "q"})
    assert not missing.ok and "not configured" in missing.error
    seen = []

    async def search(query, top_k):
        seen.append((query, top_k))
        return [{"id": "doc-1#0", "text": "passage"}]

    ctx.retrieve = search
    outcome = await registry.run(registry.get("retrieve"), ctx, {"query": "q", "top_k": 2})
    assert outcome.result["results"][0]["id"] == "doc-1#0" and seen == [("q", 2)]


async def test_a_crashing_tool_is_an_error_message_not_an_exception(tmp_path):
    registry = ToolRegistry()

    async def boom(ctx, args):
        raise RuntimeError("kaput")

    tool = registry.register(Tool("boom", "Fails.", {"type": "object"}, boom))
    outcome = await registry.run(tool, context(tmp_path), {})
    assert not outcome.ok and "kaput" in outcome.error


async def test_unconfirmed_irreversible_calls_are_refused_by_the_registry(tmp_path):
    """The second lock behind the runner's pause: without ctx.confirmed nothing
    irreversible runs, whatever path the call took."""
    registry = default_registry()
    ctx = context(tmp_path, confirmed=False)
    (ctx.workspace.root / "keep.txt").write_text("keep")
    for name, arguments in (("files.write", {"path": "a.txt", "content": "x"}),
                            ("files.delete", {"path": "keep.txt"}),
                            ("python", {"code": "open('b.txt', 'w')",
                                        "write_workspace": True})):
        outcome = await registry.run(registry.get(name), ctx, arguments)
        assert not outcome.ok and "confirmation" in outcome.error, name
    assert sorted(p.name for p in ctx.workspace.root.iterdir()) == ["keep.txt"]
    assert registry.get("python").needs_confirmation({"code": "1", "write_workspace": True})
    assert not registry.get("python").needs_confirmation({"code": "1"})
