"""Class 8: nothing irreversible happens without a confirmation, and the key that asked
may not confirm its own call unless a policy says so. The python tool sees the workspace
read-only unless the call (python with write_workspace=true) was confirmed; the audit log
names who asked and who approved."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from deployments.agent_runner import AgentRunner
from serve_app.errors import ApiError, is_error_payload
from tests.support.agent_env import (agent_service, principal, recording_target, scripted_model,
                                     service)
from tests.support.scripted_model import answer, tool_call

__all__ = ["agent_service", "recording_target", "scripted_model"]  # fixtures used by this module

CREATOR = principal("key-creator", can_confirm=True)
OPERATOR = principal("key-operator", can_confirm=True)



def workspace_of(tmp_path: Path, session_id: str) -> Path:
    return tmp_path / "agent" / "workspaces" / session_id


async def seeded_session(agent, tmp_path) -> tuple[dict, Path]:
    session = await agent.create_session(principal=CREATOR)
    workspace = workspace_of(tmp_path, session["id"])
    (workspace / "keep.txt").write_text("precious")
    return session, workspace


@pytest.mark.parametrize("code", [
    "open('new.txt', 'w').write('x')",
    "import os\nos.remove('keep.txt')",
    "open('keep.txt', 'w').write('overwritten')",
    "import os\nos.rename('keep.txt', 'moved.txt')",
    "import shutil\nshutil.rmtree('/workspace')",
])
async def test_python_cannot_change_the_workspace_without_confirmation(
        agent, scripted_model, tmp_path, code):
    session, workspace = await seeded_session(agent, tmp_path)
    scripted_model.script(tool_call("python", {"code": code}), answer("tried"))
    result = await agent.post_message(session["id"], "go", principal=CREATOR)
    assert result["status"] == "completed"  # ran without a pause (decision auto) ...
    assert sorted(p.name for p in workspace.iterdir()) == ["keep.txt"]  # ... changed nothing
    assert (workspace / "keep.txt").read_text() == "precious"
    record = (await agent.audit(session["id"], principal=CREATOR))["data"][0]
    assert record["decision"] == "auto" and record["status"] == "failed"


async def test_python_can_still_read_the_workspace_and_use_tmp(agent, scripted_model, tmp_path):
    session, _ = await seeded_session(agent, tmp_path)
    scripted_model.script(tool_call("python", {"code": (
        "open('/tmp/scratch', 'w').write('t')\nprint(open('keep.txt').read())")}),
        answer("read"))
    result = await agent.post_message(session["id"], "go", principal=CREATOR)
    output = json.loads(next(m["content"] for m in result["messages"] if m["role"] == "tool"))
    assert output["ok"] and "precious" in output["result"]["stdout"]


async def test_writing_python_pauses_and_another_key_confirms(agent, scripted_model, tmp_path):
    session, workspace = await seeded_session(agent, tmp_path)
    scripted_model.script(tool_call("python", {"code": "open('out.txt', 'w').write('42')",
                                               "write_workspace": True}), answer("saved"))
    paused = await agent.post_message(session["id"], "save it", principal=CREATOR)
    assert paused["status"] == "awaiting_confirmation"
    pending = paused["pending_confirmation"]
    assert pending["tool"] == "python" and pending["requested_by"] == "key-creator"
    assert not (workspace / "out.txt").exists()
    with pytest.raises(ApiError) as own:
        await agent.confirm(session["id"], pending["call_id"], approve=True,
                            principal=CREATOR)
    assert own.value.status == 403 and own.value.code == "self_confirmation_not_allowed"
    assert not (workspace / "out.txt").exists()
    done = await agent.confirm(session["id"], pending["call_id"], approve=True,
                               principal=OPERATOR)
    assert done["answer"] == "saved" and (workspace / "out.txt").read_text() == "42"
    record = (await agent.audit(session["id"], principal=CREATOR))["data"][0]
    assert (record["decision"], record["requester"], record["confirmer"]) == (
        "approved", "key-creator", "key-operator")
    events = (await agent.audit(session["id"], principal=CREATOR))["events"]
    assert [e["requester"] for e in events if e["event"] in ("requested", "started")] == [
        "key-creator", "key-creator"]
    assert agent.verify_audit_chain() is None


@pytest.mark.parametrize("tool, arguments", [
    ("files_write", {"path": "keep.txt", "content": "gone"}),
    ("files_delete", {"path": "keep.txt"}),
])
async def test_a_key_cannot_approve_its_own_file_changes(agent, scripted_model, tmp_path,
                                                         tool, arguments):
    session, workspace = await seeded_session(agent, tmp_path)
    scripted_model.script(tool_call(tool, arguments), answer("ok"))
    paused = await agent.post_message(session["id"], "change it", principal=CREATOR)
    with pytest.raises(ApiError) as own:
        await agent.confirm(session["id"], paused["pending_confirmation"]["call_id"],
                            approve=True, principal=CREATOR)
    assert own.value.status == 403
    assert (workspace / "keep.txt").read_text() == "precious"
    view = await agent.get(session["id"], principal=CREATOR)
    assert view["status"] == "awaiting_confirmation"


async def test_self_confirmation_only_where_a_policy_allows_it(tmp_path, scripted_model):
    trusted = principal("key-solo", can_confirm=True, can_self_confirm=True)
    for svc, who in ((service(tmp_path / "a", scripted_model), trusted),
                     (service(tmp_path / "b", scripted_model,
                              settings={"allow_self_confirmation": True}), CREATOR)):
        session = await svc.create_session(principal=who)
        scripted_model.script(tool_call("files_write", {"path": "a.txt", "content": "x"}),
                              answer("done"))
        paused = await svc.post_message(session["id"], "write", principal=who)
        done = await svc.confirm(session["id"], paused["pending_confirmation"]["call_id"],
                                 approve=True, principal=who)
        assert done["answer"] == "done"
        record = (await svc.audit(session["id"], principal=who))["data"][0]
        assert record["requester"] == record["confirmer"] == who.key_id
        svc.close()


async def test_a_key_without_can_confirm_never_approves(agent, scripted_model, tmp_path):
    session, workspace = await seeded_session(agent, tmp_path)
    reader = principal("key-reader")
    await agent.grant(session["id"], "key-reader", "read", principal=CREATOR)
    scripted_model.script(tool_call("files_delete", {"path": "keep.txt"}))
    paused = await agent.post_message(session["id"], "delete", principal=CREATOR)
    with pytest.raises(ApiError) as refused:
        await agent.confirm(session["id"], paused["pending_confirmation"]["call_id"],
                            approve=True, principal=reader)
    assert refused.value.status == 403 and refused.value.code == "confirmation_not_allowed"
    assert (workspace / "keep.txt").exists()


async def test_the_deployment_takes_the_confirmer_from_the_principal(tmp_path, scripted_model):
    runner = AgentRunner.func_or_class({"data_dir": str(tmp_path), "agent": {
        "llm_base_url": scripted_model.base_url, "model": "scripted"}})
    creator = {"tenant_id": "t1", "key_id": "k-user", "can_confirm": True}
    created = await runner.create_session({"tools": ["files.write"]}, "t1", creator)
    scripted_model.script(tool_call("files_write", {"path": "a.txt", "content": "x"}),
                          answer("done"))
    paused = await runner.post_message(created["id"], {"content": "write"}, "t1", creator)
    call_id = paused["pending_confirmation"]["call_id"]
    own = await runner.confirm_call(created["id"], call_id, {"approve": True}, creator)
    assert is_error_payload(own) and own["code"] == "self_confirmation_not_allowed"
    operator = {"tenant_id": "t1", "key_id": "k-op", "can_confirm": True}
    done = await runner.confirm_call(created["id"], call_id, {"approve": True}, operator)
    assert done["answer"] == "done"
    audit = await runner.audit(created["id"], "t1", creator)
    assert audit["data"][0]["requester"] == "k-user"
    assert audit["data"][0]["confirmer"] == "k-op"
