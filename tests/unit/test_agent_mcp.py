"""Agent tools from MCP servers: a real server written with the SDK (tests/support/
mcp_server.py) over stdio (a child process the agent starts) and streamable HTTP (a
subprocess on a free 127.0.0.1 port), driven by the scripted model. The MCP tools go
through the agent's own rules: session tool lists, confirmation, audit, budgets, limits."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from serve_app.agent.config import AgentSettings
from serve_app.agent.mcp_tools import check_tool, confirmation, result_payload
from serve_app.errors import ApiError
from tests.support.agent_env import service
from tests.support.scripted_model import answer, tool_call

SERVER = Path(__file__).resolve().parents[1] / "support" / "mcp_server.py"
CALLS_ENV = "LLMSTACK_TEST_MCP_CALLS"
AUTH_ENV = "LLMSTACK_TEST_MCP_AUTH"
TOKEN = "test-token-" + uuid.uuid4().hex


# ----------------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def http_server(tmp_path_factory):
    """The test server over streamable HTTP, behind a bearer token (killed by pid)."""
    calls = tmp_path_factory.mktemp("mcp-http") / "calls.jsonl"
    env = {**os.environ, "MCP_TEST_TOKEN": TOKEN, "MCP_TEST_CALLS": str(calls)}
    proc = subprocess.Popen([sys.executable, str(SERVER), "http"], stdout=subprocess.PIPE,
                            env=env, text=True, start_new_session=True)
    try:
        port = int(proc.stdout.readline())
        yield {"url": f"http://127.0.0.1:{port}/mcp", "calls": calls, "pid": proc.pid}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture
def stdio_calls(tmp_path, monkeypatch):
    path = tmp_path / "calls.jsonl"
    monkeypatch.setenv(CALLS_ENV, str(path))
    return path


def stdio(name: str = "t", *extra: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "transport": "stdio", "command": sys.executable,
            "args": [str(SERVER), "stdio", *extra],
            "env": {"MCP_TEST_CALLS": CALLS_ENV}, "connect_timeout_s": 20, **fields}


def http(server: dict[str, Any], name: str = "t", **fields: Any) -> dict[str, Any]:
    return {"name": name, "transport": "http", "url": server["url"],
            "headers_env": {"Authorization": AUTH_ENV}, **fields}


@pytest.fixture(params=["stdio", "http"])
def transport(request, monkeypatch, stdio_calls):
    """(the server's settings, its calls file) over each transport."""
    monkeypatch.setenv(AUTH_ENV, f"Bearer {TOKEN}")
    if request.param == "stdio":
        return stdio(), stdio_calls
    server = request.getfixturevalue("http_server")
    return http(server), server["calls"]


@pytest.fixture
async def make_agent(tmp_path, model):
    made = []

    def make(*servers: dict[str, Any], **settings: Any):
        agent = service(tmp_path / f"a{len(made)}", model,
                        settings={"mcp_servers": list(servers), **settings})
        made.append(agent)
        return agent

    yield make
    for agent in made:
        await agent.aclose()


def calls_in(path: Path, **match: Any) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [r for r in rows if all(r["arguments"].get(k) == v for k, v in match.items())]


def tool_results(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(m["content"]) for m in result["messages"] if m["role"] == "tool"]


# ----------------------------------------------------------------------------- listing, calls
async def test_tools_are_listed_namespaced_and_a_read_only_one_runs(make_agent, model,
                                                                    transport):
    server, calls = transport
    agent = make_agent(server)
    key = "alpha"
    session = await agent.create_session(tools=["mcp__t"])  # the whole server
    tools = {t["name"]: t for t in session["tools"]}
    assert {"mcp__t__lookup", "mcp__t__delete_record", "mcp__t__add_note",
            "mcp__t__sleep"} <= set(tools)
    assert tools["mcp__t__lookup"]["confirmation"] == "never"
    assert tools["mcp__t__delete_record"]["confirmation"] == "always"
    assert tools["mcp__t__add_note"]["confirmation"] == "always"
    before = len(calls_in(calls, key=key))
    model.script(tool_call("mcp__t__lookup", {"key": key}), answer("found it"))
    result = await agent.post_message(session["id"], "look alpha up")
    assert result["status"] == "completed" and result["answer"] == "found it"
    offered = {t["function"]["name"]: t["function"] for t in model.requests[0]["tools"]}
    assert offered["mcp__t__lookup"]["parameters"]["required"] == ["key"]
    assert "Look a record up" in offered["mcp__t__lookup"]["description"]
    [outcome] = tool_results(result)
    assert outcome["ok"] and outcome["result"]["text"] == "first letter"
    assert len(calls_in(calls, key=key)) == before + 1
    [record] = (await agent.audit(session["id"]))["data"]
    assert (record["tool"], record["decision"], record["status"]) == (
        "mcp__t__lookup", "auto", "succeeded")
    assert record["arguments"] == {"key": key}
    assert agent.verify_audit_chain() is None


async def test_a_destructive_tool_runs_only_once_approved(make_agent, model, transport):
    server, calls = transport
    agent = make_agent(server)
    key = f"k-{uuid.uuid4().hex[:8]}"
    model.script(tool_call("mcp__t__delete_record", {"key": key}), answer("deleted"))
    session = await agent.create_session(tools=["mcp__t__delete_record", "files.list"])
    paused = await agent.post_message(session["id"], "delete it")
    pending = paused["pending_confirmation"]
    assert paused["status"] == "awaiting_confirmation"
    assert pending["tool"] == "mcp__t__delete_record" and pending["arguments"] == {"key": key}
    assert "declares this tool destructive" in pending["reason"]
    assert calls_in(calls, key=key) == []  # nothing ran on the model's word
    done = await agent.confirm(session["id"], pending["call_id"], approve=True,
                               confirmer="operator", may_confirm=True)
    assert done["answer"] == "deleted"
    assert len(calls_in(calls, key=key)) == 1
    assert tool_results(done)[0]["result"]["text"] == f"no record {key!r}"
    [record] = (await agent.audit(session["id"]))["data"]
    assert (record["decision"], record["confirmer"], record["status"]) == (
        "approved", "operator", "succeeded")
    assert record["arguments"] == {"key": key}
    assert agent.verify_audit_chain() is None


async def test_a_denied_destructive_call_never_reaches_the_server(make_agent, model,
                                                                  transport):
    server, calls = transport
    agent = make_agent(server)
    key = f"k-{uuid.uuid4().hex[:8]}"
    model.script(tool_call("mcp__t__delete_record", {"key": key}), answer("not deleted"))
    session = await agent.create_session(tools=["mcp__t"])
    paused = await agent.post_message(session["id"], "delete it")
    done = await agent.confirm(session["id"], paused["pending_confirmation"]["call_id"],
                               approve=False, confirmer="operator", may_confirm=True)
    assert done["answer"] == "not deleted"
    assert "refused" in tool_results(done)[0]["error"]
    assert calls_in(calls, key=key) == []
    [record] = (await agent.audit(session["id"]))["data"]
    assert (record["decision"], record["status"]) == ("denied", "failed")
    assert record["arguments"] == {"key": key}
    assert agent.verify_audit_chain() is None


async def test_a_tool_not_declared_read_only_needs_confirmation(make_agent, model,
                                                                stdio_calls):
    agent = make_agent(stdio())
    model.script(tool_call("mcp__t__add_note", {"text": "hi"}))
    session = await agent.create_session(tools=["mcp__t__add_note"])
    paused = await agent.post_message(session["id"], "note it")
    assert "does not declare this tool read-only" in paused["pending_confirmation"]["reason"]
    assert calls_in(stdio_calls) == []


async def test_confirm_always_makes_read_only_tools_wait_too(make_agent, model, stdio_calls):
    agent = make_agent(stdio(confirm="always"))
    model.script(tool_call("mcp__t__lookup", {"key": "alpha"}))
    session = await agent.create_session(tools=["mcp__t__lookup"])
    paused = await agent.post_message(session["id"], "look it up")
    assert paused["status"] == "awaiting_confirmation"
    assert "confirm every call" in paused["pending_confirmation"]["reason"]
    assert calls_in(stdio_calls) == []


async def test_allowlists_apply(make_agent, model, stdio_calls):
    agent = make_agent(stdio(tools=["lookup", "delete_record"]))
    with pytest.raises(ApiError) as unknown:  # not on the server's allowlist
        await agent.create_session(tools=["mcp__t__add_note"])
    assert unknown.value.status == 422 and unknown.value.code == "unknown_tool"
    session = await agent.create_session(tools=["mcp__t"])
    assert [t["name"] for t in session["tools"]] == ["mcp__t__lookup", "mcp__t__delete_record"]
    # The session's own list: a server tool it did not ask for is refused, never run.
    narrow = await agent.create_session(tools=["mcp__t__lookup"])
    model.script(tool_call("mcp__t__delete_record", {"key": "alpha"}), answer("ok"))
    result = await agent.post_message(narrow["id"], "delete alpha")
    assert "unknown tool" in tool_results(result)[0]["error"]
    assert calls_in(stdio_calls) == []
    [record] = (await agent.audit(narrow["id"]))["data"]
    assert record["tool"] == "mcp__t__delete_record" and record["status"] == "failed"


async def test_default_tools_and_budgets_cover_mcp_tools(make_agent, model, stdio_calls):
    agent = make_agent(stdio(in_default_tools=True, tools=["lookup"]))
    session = await agent.create_session(budgets={"max_tool_calls": 1})
    assert "mcp__t__lookup" in [t["name"] for t in session["tools"]]
    model.script(tool_call("mcp__t__lookup", {"key": "alpha"}),
                 tool_call("mcp__t__lookup", {"key": "beta"}), answer("never"))
    result = await agent.post_message(session["id"], "look twice")
    assert result["status"] == "stopped" and result["stop"]["reason"] == "max_tool_calls"
    assert [c["arguments"]["key"] for c in calls_in(stdio_calls)] == ["alpha"]


async def test_stdio_servers_see_only_the_variables_named_for_them(make_agent, model,
                                                                   stdio_calls, monkeypatch):
    monkeypatch.setenv("LLMSTACK_TEST_SECRET", "do-not-leak")
    agent = make_agent(stdio())
    model.script(tool_call("mcp__t__env_names", {}), answer("ok"))
    session = await agent.create_session(tools=["mcp__t__env_names"])
    text = tool_results(await agent.post_message(session["id"], "env"))[0]["result"]["text"]
    names = set(text.split("\n"))
    assert "MCP_TEST_CALLS" in names and "PATH" in names
    assert "LLMSTACK_TEST_SECRET" not in names and CALLS_ENV not in names


# ----------------------------------------------------------------------------- hostile servers
async def test_hostile_tools_are_dropped_and_the_rest_work(make_agent, model, stdio_calls):
    agent = make_agent(stdio("t", "--hostile"))
    session = await agent.create_session(tools=["mcp__t"])
    names = [t["name"] for t in session["tools"]]
    assert "mcp__t__lookup" in names and "mcp__t__long_description" in names
    for bad in ("invalid_schema", "huge_schema", "deep_schema", "remote_ref", "bad_defs"):
        assert f"mcp__t__{bad}" not in names
    assert not any(" " in n or len(n) > 64 for n in names)
    [status] = agent.mcp.status()
    reasons = {d["tool"]: d["reason"] for d in status["dropped"]}
    assert "OpenAI function name" in reasons["'bad name!'"]
    assert "OpenAI function name" in reasons[repr("n" * 80)]
    assert "invalid JSON Schema" in reasons["'invalid_schema'"]
    assert "bytes; at most" in reasons["'huge_schema'"]
    assert "deeper than" in reasons["'deep_schema'"]
    assert "outside the schema" in reasons["'remote_ref'"]
    assert "invalid JSON Schema" in reasons["'bad_defs'"]
    assert "already registered" in reasons["'lookup'"]  # the second tool named lookup
    long = agent.registry.get("mcp__t__long_description")
    assert len(long.description) <= 2000 + len(" [cut]")
    model.script(tool_call("mcp__t__lookup", {"key": "beta"}), answer("ok"))
    result = await agent.post_message(session["id"], "look beta up")
    assert tool_results(result)[0]["result"]["text"] == "second letter"


async def test_only_max_tools_are_taken(make_agent, stdio_calls):
    agent = make_agent(stdio(max_tools=2))
    session = await agent.create_session(tools=["mcp__t"])
    assert [t["name"] for t in session["tools"]] == ["mcp__t__lookup", "mcp__t__delete_record"]
    assert any("max_tools" in d["reason"] for d in agent.mcp.status()[0]["dropped"])


class _Listed:
    """A listed tool as the SDK hands it over (mcp.types.Tool's attributes)."""

    def __init__(self, name, input_schema, description="d", output_schema=None,
                 annotations=None, title=None):
        self.name, self.input_schema, self.description = name, input_schema, description
        self.output_schema, self.annotations, self.title = output_schema, annotations, title


@pytest.mark.parametrize("tool, fragment", [
    (_Listed("ok", {"type": "string"}), "not of type object"),
    (_Listed("ok", {"type": "object"}, description="bad \ud800"), "surrogate"),
    (_Listed("ok", {"type": "object"}, output_schema={"type": 3}), "output schema"),
    (_Listed("x" * 60, {"type": "object"}), "OpenAI function name"),
    (_Listed("ünï", {"type": "object"}), "OpenAI function name"),
])
def test_check_tool_refuses_what_the_sdk_lets_through(tool, fragment):
    server = AgentSettings.model_validate({"mcp_servers": [stdio()]}).mcp_servers[0]
    with pytest.raises(ValueError, match=fragment):
        check_tool(server, tool)
    dotted = check_tool(server, _Listed("a.b", {"type": "object"}))
    assert dotted.name == "mcp__t__a.b" and dotted.remote_name == "a.b"


def test_confirmation_rule():
    class Hints:
        def __init__(self, read_only=None, destructive=None):
            self.read_only_hint, self.destructive_hint = read_only, destructive

    assert confirmation(Hints(read_only=True), "annotations", "s") is None
    assert "destructive" in confirmation(Hints(read_only=True, destructive=True),
                                         "annotations", "s")
    assert "read-only" in confirmation(Hints(), "annotations", "s")
    assert "read-only" in confirmation(None, "annotations", "s")
    assert "read-only" in confirmation(Hints(read_only=False, destructive=False),
                                       "annotations", "s")
    assert confirmation(Hints(read_only=True), "always", "s") is not None


def test_results_are_cut_and_non_text_is_summarised():
    from mcp.types import CallToolResult, ImageContent, TextContent

    result = CallToolResult(content=[TextContent(text="a" * 5000),
                                     ImageContent(data="QUJD" * 100, mime_type="image/png")])
    payload = result_payload(result, 1000)
    assert len(payload["text"]) < 1100 and "[cut:" in payload["text"]
    both = result_payload(CallToolResult(content=[
        TextContent(text="hi"), ImageContent(data="QUJD", mime_type="image/png")]), 1000)
    assert both["text"] == "hi\n[image image/png: 4 base64 characters not shown]"
    structured = result_payload(CallToolResult(content=[], structured_content={"v": 1}), 100)
    assert structured == {"text": "", "structured_content": {"v": 1}}
    assert result_payload(CallToolResult(content=[TextContent(text="x\ud800")]), 100)[
        "text"] == "x?"


# ----------------------------------------------------------------------------- failures
async def test_a_hanging_call_times_out_and_the_server_stays_usable(make_agent, model,
                                                                    stdio_calls):
    agent = make_agent(stdio(call_timeout_s=1))
    model.script(tool_call("mcp__t__sleep", {"seconds": 60}),
                 tool_call("mcp__t__lookup", {"key": "alpha"}), answer("done"))
    session = await agent.create_session(tools=["mcp__t"])
    started = time.monotonic()
    result = await agent.post_message(session["id"], "sleep, then look up")
    assert time.monotonic() - started < 15
    slept, looked = tool_results(result)
    assert not slept["ok"] and "did not answer within 1s" in slept["error"]
    assert looked["ok"] and looked["result"]["text"] == "first letter"
    records = (await agent.audit(session["id"]))["data"]
    assert [(r["tool"], r["status"]) for r in records] == [
        ("mcp__t__sleep", "failed"), ("mcp__t__lookup", "succeeded")]
    assert "did not answer" in records[0]["error"] and records[0]["arguments"] == {
        "seconds": 60}


async def test_concurrent_calls_share_one_connection(make_agent, stdio_calls, tmp_path):
    """Sessions share a server's connection; a slow call does not hold up the others."""
    import asyncio

    from serve_app.agent.sandbox import Sandbox
    from serve_app.agent.tools import ToolContext, Workspace

    agent = make_agent(stdio())
    await agent.create_session(tools=["mcp__t"])
    ctx = ToolContext(session_id="s", workspace=Workspace(tmp_path), settings=agent.settings,
                      sandbox=Sandbox(agent.settings.sandbox), time_left_s=30)
    registry = agent.registry
    finished: list[str] = []

    async def run(name: str, arguments: dict[str, Any]) -> Any:
        outcome = await registry.run(registry.get(name), ctx, arguments)
        finished.append(name)
        return outcome

    outcomes = await asyncio.gather(
        run("mcp__t__sleep", {"seconds": 2}),
        *(run("mcp__t__lookup", {"key": key}) for key in ("alpha", "beta", "gamma")))
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert finished[-1] == "mcp__t__sleep"
    assert [o.result["text"] for o in outcomes[1:]] == [
        "first letter", "second letter", "no record 'gamma'"]
    assert len({c["pid"] for c in calls_in(stdio_calls)}) == 1


async def test_a_server_that_never_answers_is_unavailable_fast(make_agent, model,
                                                                stdio_calls, monkeypatch):
    monkeypatch.setenv("LLMSTACK_TEST_MCP_DELAY", "60")
    agent = make_agent(stdio("slow", connect_timeout_s=1, retry_after_s=600,
                             env={"MCP_TEST_START_DELAY": "LLMSTACK_TEST_MCP_DELAY"}))
    started = time.monotonic()
    with pytest.raises(ApiError) as first:
        await agent.create_session(tools=["mcp__slow__lookup"])
    assert first.value.status == 503 and first.value.code == "tool_unavailable"
    assert "initialize within 1s" in first.value.message
    with pytest.raises(ApiError):  # within retry_after_s: no second wait
        await agent.create_session(tools=["mcp__slow"])
    assert time.monotonic() - started < 15
    plain = await agent.create_session(tools=["files.list"])  # the rest of the agent works
    assert plain["status"] == "completed"


async def test_a_crashing_server_is_an_error_result_and_restarts(make_agent, model,
                                                                 stdio_calls):
    agent = make_agent(stdio())
    model.script(tool_call("mcp__t__crash", {}),
                 tool_call("mcp__t__lookup", {"key": "alpha"}), answer("recovered"))
    session = await agent.create_session(tools=["mcp__t"])
    result = await agent.post_message(session["id"], "crash, then look up")
    crashed, looked = tool_results(result)
    assert not crashed["ok"] and "outcome is unknown" in crashed["error"]
    assert looked["ok"] and result["answer"] == "recovered"
    pids = [c["pid"] for c in calls_in(stdio_calls)]
    assert len(pids) == 2 and pids[0] != pids[1]  # a new server process
    records = (await agent.audit(session["id"]))["data"]
    assert [r["status"] for r in records] == ["failed", "succeeded"]


async def test_tool_errors_and_big_results(make_agent, model, stdio_calls):
    agent = make_agent(stdio(max_result_chars=1000), tool_result_max_chars=4000)
    model.script(tool_call("mcp__t__fail", {"message": "no such thing"}),
                 tool_call("mcp__t__big", {"chars": 200_000}), answer("ok"))
    session = await agent.create_session(tools=["mcp__t"])
    result = await agent.post_message(session["id"], "fail, then big")
    failed, big = tool_results(result)
    assert not failed["ok"] and "no such thing" in failed["error"]
    assert big["ok"] and len(big["result"]["text"]) < 1100
    records = (await agent.audit(session["id"]))["data"]
    assert "no such thing" in records[0]["error"]


async def test_http_secrets_come_from_the_environment(make_agent, http_server, monkeypatch,
                                                      caplog):
    monkeypatch.delenv(AUTH_ENV, raising=False)
    agent = make_agent(http(http_server, retry_after_s=0))
    with pytest.raises(ApiError) as unset:
        await agent.create_session(tools=["mcp__t__lookup"])
    assert unset.value.status == 503 and AUTH_ENV in unset.value.message
    monkeypatch.setenv(AUTH_ENV, "Bearer wrong-token")
    with pytest.raises(ApiError) as wrong:
        await agent.create_session(tools=["mcp__t__lookup"])
    assert wrong.value.status == 503
    monkeypatch.setenv(AUTH_ENV, f"Bearer {TOKEN}")
    session = await agent.create_session(tools=["mcp__t__lookup"])
    assert session["tools"][0]["name"] == "mcp__t__lookup"
    assert TOKEN not in caplog.text and "wrong-token" not in caplog.text


# ----------------------------------------------------------------------------- settings, shell
@pytest.mark.parametrize("server, fragment", [
    ({"name": "Bad_Name", "transport": "stdio", "command": "x"}, "must match"),
    ({"name": "a", "transport": "stdio", "command": "x", "env": {"TOKEN": "abc def"}},
     "NAME of an environment variable"),
    ({"name": "a", "transport": "http", "url": "https://u:p@host/mcp"}, "credentials"),
    ({"name": "a", "transport": "http", "url": "ftp://host/mcp"}, "http"),
    ({"name": "a", "transport": "http", "url": "https://h/mcp",
      "headers_env": {"Authorization": "Bearer sk-123"}}, "NAME of an environment"),
    ({"name": "a", "transport": "ws", "url": "https://h/mcp"}, "transport"),
    ({"name": "a", "transport": "stdio", "command": "x", "tools": ["bad name"]},
     "not an MCP tool name"),
])
def test_bad_server_settings_are_refused(server, fragment):
    with pytest.raises(ValidationError, match=fragment):
        AgentSettings.model_validate({"mcp_servers": [server]})


def test_server_names_are_unique():
    with pytest.raises(ValidationError, match="same name"):
        AgentSettings.model_validate({"mcp_servers": [
            {"name": "a", "transport": "stdio", "command": "x"},
            {"name": "a", "transport": "http", "url": "http://h/mcp"}]})


async def test_the_deployment_shell_wires_mcp_servers(tmp_path, model, stdio_calls):
    from deployments.agent_runner import AgentRunner

    runner = AgentRunner.func_or_class({"data_dir": str(tmp_path), "agent": {
        "llm_base_url": model.base_url, "model": "scripted", "mcp_servers": [stdio()]}})
    try:
        model.script(tool_call("mcp__t__lookup", {"key": "beta"}), answer("beta found"))
        created = await runner.create_session({"tools": ["mcp__t__lookup"]}, "tenant")
        done = await runner.post_message(created["id"], {"content": "look"}, "tenant")
        assert done["answer"] == "beta found"
        assert runner.verify_audit_chain()["valid"]
    finally:
        await runner.__del__()
        runner.service.close()
