"""Agent sessions through HTTP: the loop runs in AgentRunner, each LLM step goes through
the gateway's routing and ledger. A scripted OpenAI-compatible model (a real HTTP server,
registered as a provider) makes the guardrail tests deterministic; one test uses the real
local model with structured output."""
from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from tests.support.keys import admin_client, create_key
from tests.support.scripted_model import ScriptedModel, answer, tool_call

LOCAL = "smollm2-135m-instruct"
TOOLS = ["python", "files.read", "files.list", "files.write", "files.delete"]
# A real MCP server (the SDK's MCPServer) that each AgentRunner replica starts over stdio.
MCP_SERVER = Path(__file__).resolve().parents[1] / "support" / "mcp_server.py"


@pytest.fixture(scope="module")
def scripted():
    model = ScriptedModel(model_name="scripted-model").start()
    yield model
    model.stop()


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory, scripted):
    data_dir = tmp_path_factory.mktemp("agent")
    cluster.deploy_stack(data_dir, {
        "cache": {"enabled": False},
        "router": {"providers": [{"name": "scripted", "base_url": scripted.base_url,
                                  "model": "scripted-model", "price_in_per_mtok": 1000.0,
                                  "price_out_per_mtok": 1000.0}],
                   "tiers": {"small": ["local"], "medium": ["local"], "large": ["local"]}},
        "agent": {"model": "scripted-model", "default_tools": TOOLS, "llm_max_tokens": 128,
                  "sandbox": {"wall_seconds": 20},
                  "mcp_servers": [{"name": "test", "transport": "stdio",
                                   "command": sys.executable,
                                   "args": [str(MCP_SERVER), "stdio"]}]}})
    cluster.keys = {"user": create_key(cluster.base_url, tenant="agents"),
                    "colleague": create_key(cluster.base_url, tenant="agents"),
                    "operator": create_key(cluster.base_url, tenant="agents", can_confirm=True),
                    "stranger": create_key(cluster.base_url, tenant="others")}
    return cluster


def http(stack, who: str = "user") -> httpx.Client:
    return httpx.Client(base_url=stack.base_url, timeout=600,
                        headers={"authorization": f"Bearer {stack.keys[who]['key']}"})


def new_session(stack, **body) -> dict:
    with http(stack) as client:
        response = client.post("/v1/agent/sessions", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def say(stack, session_id: str, content: str, who: str = "user") -> httpx.Response:
    with http(stack, who) as client:
        return client.post(f"/v1/agent/sessions/{session_id}/messages", json={"content": content})


def test_irreversible_call_pauses_and_only_an_allowed_key_can_approve(stack, scripted):
    scripted.script(tool_call("files_write", {"path": "notes.txt", "content": "hello"}),
                    answer("Written."))
    session = new_session(stack, goal="write a note")
    paused = say(stack, session["id"], "Write hello to notes.txt").json()
    assert paused["status"] == "awaiting_confirmation"
    pending = paused["pending_confirmation"]
    assert pending["tool"] == "files.write" and pending["arguments"]["path"] == "notes.txt"
    with http(stack) as client:  # the session's own key may not confirm
        refused = client.post(f"/v1/agent/sessions/{session['id']}/confirmations/"
                              f"{pending['call_id']}", json={"approve": True})
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "confirmation_not_allowed"
        listing = client.get(f"/v1/agent/sessions/{session['id']}").json()
        assert listing["status"] == "awaiting_confirmation"
    with http(stack, "operator") as client:
        done = client.post(f"/v1/agent/sessions/{session['id']}/confirmations/"
                           f"{pending['call_id']}", json={"approve": True}).json()
        again = client.post(f"/v1/agent/sessions/{session['id']}/confirmations/"
                            f"{pending['call_id']}", json={"approve": True})
    assert done["status"] == "completed" and done["answer"] == "Written."
    assert again.status_code == 409  # approved once, executed once
    with http(stack) as client:
        audit = client.get(f"/v1/agent/sessions/{session['id']}/audit").json()["data"]
    assert [(c["tool"], c["decision"], c["status"]) for c in audit] == [
        ("files.write", "approved", "succeeded")]
    assert audit[0]["confirmer"] == stack.keys["operator"]["key_id"]


def test_denied_call_never_runs_and_the_model_is_told(stack, scripted):
    scripted.script(tool_call("files_delete", {"path": "important.txt"}), answer("Understood."))
    session = new_session(stack)
    paused = say(stack, session["id"], "Delete important.txt").json()
    call_id = paused["pending_confirmation"]["call_id"]
    with http(stack, "operator") as client:
        result = client.post(f"/v1/agent/sessions/{session['id']}/confirmations/{call_id}",
                             json={"approve": False}).json()
    assert result["status"] == "completed"
    tool_message = [m for m in result["messages"] if m["role"] == "tool"][-1]
    assert "refused" in tool_message["content"].lower() or "denied" in tool_message["content"].lower()
    with http(stack) as client:
        audit = client.get(f"/v1/agent/sessions/{session['id']}/audit").json()["data"]
    assert audit[0]["decision"] == "denied" and audit[0]["status"] != "succeeded"
    with http(stack) as client:  # nothing was deleted: the file was never there, and
        files = client.get(f"/v1/agent/sessions/{session['id']}").json()  # no tool ran
    assert files["usage"]["tool_calls"] <= 1


def test_sandboxed_python_runs_and_the_budget_stops_the_session(stack, scripted):
    scripted.script(tool_call("python", {"code": "print(6 * 7)"}),
                    tool_call("python", {"code": "print(1)"}),
                    tool_call("python", {"code": "print(2)"}), answer("never reached"))
    # Only the tool budget binds here (at $1000/M tokens the default $0.50 is close).
    session = new_session(stack, budgets={"max_tool_calls": 2, "max_usd": 5.0})
    result = say(stack, session["id"], "compute").json()
    assert result["status"] == "stopped" and result["stop"]["reason"] == "max_tool_calls"
    assert result["usage"]["tool_calls"] == 2
    outputs = [m["content"] for m in result["messages"] if m["role"] == "tool"]
    assert "42" in outputs[0]


def test_sessions_belong_to_their_tenant(stack, scripted):
    session = new_session(stack)
    with http(stack, "stranger") as client:
        assert client.get(f"/v1/agent/sessions/{session['id']}").status_code == 404
        assert client.delete(f"/v1/agent/sessions/{session['id']}").status_code == 404
    with http(stack) as client:
        assert client.delete(f"/v1/agent/sessions/{session['id']}").json()["status"] == "deleted"


def test_sessions_belong_to_their_key_and_steps_bill_the_driver(stack, scripted):
    session = new_session(stack)
    scripted.script(answer("not for you"))
    assert say(stack, session["id"], "hi", who="colleague").status_code == 403
    with http(stack, "colleague") as client:
        assert client.get(f"/v1/agent/sessions/{session['id']}").status_code == 403
    with http(stack) as client:
        granted = client.post(f"/v1/agent/sessions/{session['id']}/grants",
                              json={"key_id": stack.keys["colleague"]["key_id"],
                                    "right": "drive"})
    assert granted.status_code == 200, granted.text
    scripted.script(answer("Hello colleague."))
    assert say(stack, session["id"], "hi", who="colleague").json()["answer"] == \
        "Hello colleague."
    with admin_client(stack.base_url) as admin:
        rows = admin.get("/admin/v1/usage/requests", params={
            "key_id": stack.keys["colleague"]["key_id"]}).json()["data"]
    assert [r for r in rows if r["route"] == "/v1/agent/llm"]


def test_llm_steps_go_through_routing_and_the_ledger(stack, scripted):
    scripted.script(answer("All done."))
    session = new_session(stack)
    result = say(stack, session["id"], "Say done.").json()
    assert result["answer"] == "All done."
    assert result["usage"]["usd"] > 0  # the gateway priced the provider's tokens
    with admin_client(stack.base_url) as admin:
        rows = admin.get("/admin/v1/usage/requests",
                         params={"key_id": stack.keys["user"]["key_id"]}).json()["data"]
    steps = [r for r in rows if r["route"] == "/v1/agent/llm"]
    assert steps and steps[0]["model"] == "scripted-model" and steps[0]["status"] == 200


def test_mcp_tools_run_under_the_same_rules(stack, scripted):
    """An MCP server's tools through the deployed AgentRunner: the read-only one runs, the
    destructive one waits for a key with can_confirm, runs once, and all are audited."""
    scripted.script(tool_call("mcp__test__lookup", {"key": "beta"}),
                    tool_call("mcp__test__delete_record", {"key": "beta"}),
                    tool_call("mcp__test__lookup", {"key": "beta"}), answer("Deleted beta."))
    session = new_session(stack, tools=["mcp__test"], budgets={"max_usd": 5.0})
    assert {"mcp__test__lookup", "mcp__test__delete_record"} <= {
        t["name"] for t in session["tools"]}
    paused = say(stack, session["id"], "Delete beta").json()
    assert paused["status"] == "awaiting_confirmation", paused
    pending = paused["pending_confirmation"]
    assert pending["tool"] == "mcp__test__delete_record" and pending["arguments"] == {
        "key": "beta"}
    assert "second letter" in [m for m in paused["messages"] if m["role"] == "tool"][0][
        "content"]
    with http(stack, "operator") as client:
        done = client.post(f"/v1/agent/sessions/{session['id']}/confirmations/"
                           f"{pending['call_id']}", json={"approve": True}).json()
    assert done["status"] == "completed" and done["answer"] == "Deleted beta.", done
    deleted, after = [m["content"] for m in done["messages"] if m["role"] == "tool"][1:]
    assert "deleted beta" in deleted and "no record" in after  # it ran, once
    with http(stack) as client:
        audit = client.get(f"/v1/agent/sessions/{session['id']}/audit").json()["data"]
    assert [(c["tool"], c["decision"], c["status"]) for c in audit] == [
        ("mcp__test__lookup", "auto", "succeeded"),
        ("mcp__test__delete_record", "approved", "succeeded"),
        ("mcp__test__lookup", "auto", "succeeded")]
    assert audit[1]["arguments"] == {"key": "beta"}
    assert audit[1]["confirmer"] == stack.keys["operator"]["key_id"]


def test_audit_chain_verifies(stack):
    with admin_client(stack.base_url) as admin:
        verdict = admin.get("/admin/v1/agent/audit/verify").json()
    assert verdict["valid"] is True and verdict["first_broken"] is None


def test_bad_requests_are_clear(stack):
    with http(stack) as client:
        assert client.post("/v1/agent/sessions", json={"tools": ["rm_rf"]}).status_code == 422
        assert client.post("/v1/agent/sessions",
                           json={"budgets": {"max_tool_calls": -1}}).status_code == 422
        assert client.get("/v1/agent/sessions/as_nope").status_code == 404
    session = new_session(stack)
    assert say(stack, session["id"], "   ").status_code == 400


def test_local_model_makes_a_valid_tool_call_with_structured_output(stack):
    """The real SmolLM2 through the router to vLLM: its tool call parses and fits the
    tool's schema (the tool itself may fail: the model may name a file that is not there)."""
    session = new_session(stack, model=LOCAL, tools=["files.list", "files.read"],
                          budgets={"max_llm_calls": 1})
    result = say(stack, session["id"], "Use a tool to list the files in the workspace.").json()
    assistant = [m for m in result["messages"] if m["role"] == "assistant"][0]
    assert assistant.get("tool_calls"), assistant
    with http(stack) as client:
        calls = client.get(f"/v1/agent/sessions/{session['id']}/audit").json()["data"]
    assert calls
    for call in calls:
        assert call["tool"] in ("files.list", "files.read")
        assert isinstance(call["arguments"], dict)
        error = call["error"] or ""
        assert "invalid arguments" not in error and "unknown tool" not in error, call
