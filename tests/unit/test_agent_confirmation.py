"""Human confirmation of irreversible tool calls, driven by a scripted model over HTTP."""
from __future__ import annotations

import asyncio
import json

import pytest

from serve_app.errors import ApiError
from tests.support.agent_env import FakeClock, service
from tests.support.scripted_model import answer, tool_call


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def agent(tmp_path, model, target, clock):
    svc = service(tmp_path, model, clock=clock, settings={
        "http_post_allowlist": [f"127.0.0.1:{target.port}"], "confirmation_ttl_s": 60})
    target.received.clear()
    yield svc
    svc.close()


def post_call(target, body="hello"):
    return tool_call("http_post", {"url": f"{target.url}/send", "body": body})


async def paused_session(agent, model, target, *more_replies):
    model.script(post_call(target), *more_replies)
    session = await agent.create_session(owner="t1")
    result = await agent.post_message(session["id"], "send it", owner="t1")
    return result


async def test_irreversible_call_pauses_without_running(agent, model, target):
    result = await paused_session(agent, model, target)
    assert result["status"] == "awaiting_confirmation"
    pending = result["pending_confirmation"]
    assert pending["tool"] == "http.post" and pending["wire_name"] == "http_post"
    assert pending["arguments"] == {"url": f"{target.url}/send", "body": "hello"}
    assert "irreversible" in pending["reason"]
    assert target.received == []
    assert len(model.requests) == 1  # the loop did not go on without the human
    calls = (await agent.audit(result["id"]))["data"]
    assert [(c["tool"], c["decision"], c["status"]) for c in calls] == [
        ("http.post", "pending", "awaiting_confirmation")]


async def test_approve_executes_exactly_once_and_resumes(agent, model, target):
    result = await paused_session(agent, model, target, answer("sent"))
    call_id = result["pending_confirmation"]["call_id"]
    done = await agent.confirm(result["id"], call_id, approve=True, confirmer="admin-key",
                               may_confirm=True, owner="t1")
    assert done["status"] == "completed" and done["answer"] == "sent"
    assert [r["method"] for r in target.received] == ["POST"]
    tool_message = next(m for m in done["messages"] if m["role"] == "tool")
    assert tool_message["tool_call_id"] == call_id and json.loads(tool_message["content"])["ok"]
    with pytest.raises(ApiError) as again:
        await agent.confirm(result["id"], call_id, approve=True, confirmer="admin-key",
                            may_confirm=True, owner="t1")
    assert again.value.status == 409
    assert len(target.received) == 1
    record = (await agent.audit(result["id"]))["data"][0]
    assert record["decision"] == "approved" and record["confirmer"] == "admin-key"
    assert record["status"] == "succeeded"


async def test_concurrent_approvals_run_the_call_once(agent, model, target):
    result = await paused_session(agent, model, target, answer("sent"))
    call_id = result["pending_confirmation"]["call_id"]
    outcomes = await asyncio.gather(*(
        agent.confirm(result["id"], call_id, approve=True, confirmer=f"admin-{i}",
                      may_confirm=True) for i in range(3)), return_exceptions=True)
    succeeded = [o for o in outcomes if isinstance(o, dict)]
    refused = [o for o in outcomes if isinstance(o, ApiError)]
    assert len(succeeded) == 1 and len(refused) == 2
    assert all(e.status == 409 for e in refused)
    assert len(target.received) == 1


async def test_deny_never_executes_and_tells_the_model(agent, model, target):
    result = await paused_session(agent, model, target, answer("ok, not sent"))
    call_id = result["pending_confirmation"]["call_id"]
    done = await agent.confirm(result["id"], call_id, approve=False, confirmer="admin-key",
                               may_confirm=True)
    assert target.received == []
    assert done["status"] == "completed" and done["answer"] == "ok, not sent"
    last_request = model.requests[-1]["messages"]
    refusal = json.loads(last_request[-1]["content"])
    assert last_request[-1]["role"] == "tool" and not refusal["ok"]
    assert "refused" in refusal["error"]
    record = (await agent.audit(result["id"]))["data"][0]
    assert record["decision"] == "denied" and record["confirmer"] == "admin-key"
    assert record["status"] == "failed" and record["duration_ms"] is None


async def test_only_a_key_allowed_to_confirm_can_approve(agent, model, target):
    result = await paused_session(agent, model, target)
    call_id = result["pending_confirmation"]["call_id"]
    with pytest.raises(ApiError) as refused:
        await agent.confirm(result["id"], call_id, approve=True, confirmer="user-key",
                            may_confirm=False)
    assert refused.value.status == 403
    assert (await agent.get(result["id"]))["status"] == "awaiting_confirmation"
    assert target.received == []


async def test_unknown_call_id_and_other_tenants_get_404(agent, model, target):
    result = await paused_session(agent, model, target)
    with pytest.raises(ApiError) as unknown:
        await agent.confirm(result["id"], "call_nope", approve=True, confirmer="a",
                            may_confirm=True)
    assert unknown.value.status == 404
    with pytest.raises(ApiError) as other:
        await agent.confirm(result["id"], result["pending_confirmation"]["call_id"],
                            approve=True, confirmer="a", may_confirm=True, owner="t2")
    assert other.value.status == 404
    assert target.received == []


async def test_pending_calls_expire_unexecuted(agent, model, target, clock):
    result = await paused_session(agent, model, target)
    call_id = result["pending_confirmation"]["call_id"]
    clock.advance(61)
    view = await agent.get(result["id"])
    assert view["status"] == "completed" and view["pending_confirmation"] is None
    assert "expired" in json.loads(view["messages"][-1]["content"])["error"]
    with pytest.raises(ApiError) as late:
        await agent.confirm(result["id"], call_id, approve=True, confirmer="admin",
                            may_confirm=True)
    assert late.value.status == 409
    assert target.received == []
    record = (await agent.audit(result["id"]))["data"][0]
    assert record["decision"] == "expired" and record["error"] == "confirmation expired"


async def test_confirming_after_expiry_is_refused(agent, model, target, clock):
    result = await paused_session(agent, model, target)
    call_id = result["pending_confirmation"]["call_id"]
    clock.advance(3600)
    with pytest.raises(ApiError) as late:
        await agent.confirm(result["id"], call_id, approve=True, confirmer="admin",
                            may_confirm=True)
    assert late.value.status == 409 and late.value.code == "confirmation_expired"
    assert target.received == []


async def test_new_messages_wait_for_the_decision(agent, model, target):
    result = await paused_session(agent, model, target)
    with pytest.raises(ApiError) as busy:
        await agent.post_message(result["id"], "and another thing")
    assert busy.value.status == 409 and busy.value.code == "confirmation_pending"


async def test_file_writes_need_confirmation_too(agent, model, target, tmp_path):
    model.script(tool_call("files_write", {"path": "out/a.txt", "content": "data"}),
                 answer("written"))
    session = await agent.create_session()
    paused = await agent.post_message(session["id"], "write a file")
    workspace = tmp_path / "agent" / "workspaces" / session["id"]
    assert paused["status"] == "awaiting_confirmation"
    assert not (workspace / "out" / "a.txt").exists()
    done = await agent.confirm(session["id"], paused["pending_confirmation"]["call_id"],
                               approve=True, confirmer="admin", may_confirm=True)
    assert done["answer"] == "written"
    assert (workspace / "out" / "a.txt").read_text() == "data"


async def test_calls_after_a_paused_one_wait_for_it(agent, model, target, tmp_path):
    # One assistant turn with three calls: read (auto), post (irreversible), list (auto).
    model.script(tool_call("files_list", {}, ("http_post", {"url": f"{target.url}/p"}),
                           ("files_list", {"path": "."})), answer("all done"))
    session = await agent.create_session()
    paused = await agent.post_message(session["id"], "go")
    assert paused["status"] == "awaiting_confirmation"
    calls = (await agent.audit(session["id"]))["data"]
    assert [(c["tool"], c["status"]) for c in calls] == [
        ("files.list", "succeeded"), ("http.post", "awaiting_confirmation")]
    done = await agent.confirm(session["id"], paused["pending_confirmation"]["call_id"],
                               approve=False, confirmer="admin", may_confirm=True)
    calls = (await agent.audit(session["id"]))["data"]
    assert [(c["tool"], c["decision"]) for c in calls] == [
        ("files.list", "auto"), ("http.post", "denied"), ("files.list", "auto")]
    assert done["answer"] == "all done"
    tool_ids = [m["tool_call_id"] for m in done["messages"] if m["role"] == "tool"]
    assistant_ids = [c["id"] for c in done["messages"][2]["tool_calls"]]
    assert tool_ids == assistant_ids


# ---------------------------------------------------------------- the console's lists

async def test_pending_confirmations_are_scoped_to_what_the_caller_may_decide(agent, model,
                                                                             target):
    from serve_app.agent.access import Principal

    mine = await paused_session(agent, model, target)
    model.script(post_call(target))
    other = await agent.create_session(owner="t2")
    await agent.post_message(other["id"], "send it", owner="t2")
    confirmer = Principal(key_id="k-t1", tenant_id="t1", can_confirm=True)
    listed = await agent.pending_confirmations(confirmer)
    assert [s["id"] for s in listed] == [mine["id"]]  # never another tenant's
    assert listed[0]["pending_confirmation"]["arguments"]["body"] == "hello"
    assert "messages" not in listed[0] and listed[0]["tenant"] == "t1"
    admin = Principal(key_id="admin", tenant_id=None, can_confirm=True, admin=True)
    assert {s["id"] for s in await agent.pending_confirmations(admin)} == {mine["id"],
                                                                          other["id"]}
    with pytest.raises(ApiError) as refused:
        await agent.pending_confirmations(Principal(key_id="k2", tenant_id="t1"))
    assert refused.value.status == 403


async def test_listing_sessions_needs_the_admin_key_and_filters(agent, model, target, clock):
    from serve_app.agent.access import Principal

    paused = await paused_session(agent, model, target)
    clock.advance(5)
    model.script(answer("done"))
    finished = await agent.create_session(owner="t2")
    await agent.post_message(finished["id"], "hi", owner="t2")
    admin = Principal(key_id="admin", tenant_id=None, can_confirm=True, admin=True)
    every = await agent.list_sessions(admin)
    assert [s["id"] for s in every] == [finished["id"], paused["id"]]  # newest first
    assert every[0]["usage"]["llm_calls"] == 1 and every[0]["budgets"]["max_llm_calls"] >= 1
    assert [s["id"] for s in await agent.list_sessions(admin, tenant="t1")] == [paused["id"]]
    assert [s["id"] for s in await agent.list_sessions(
        admin, status="awaiting_confirmation")] == [paused["id"]]
    with pytest.raises(ApiError) as refused:
        await agent.list_sessions(Principal(key_id="k", tenant_id="t1", can_confirm=True))
    assert refused.value.status == 403
