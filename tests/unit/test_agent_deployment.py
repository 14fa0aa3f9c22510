"""The AgentRunner deployment shell, built without Ray: bodies validated, errors as payloads."""
from __future__ import annotations

import pytest

from deployments.agent_runner import AgentRunner
from serve_app.errors import is_error_payload
from tests.support.scripted_model import answer, tool_call


@pytest.fixture
def runner(tmp_path, model):
    settings = {"data_dir": str(tmp_path), "agent": {"llm_base_url": model.base_url,
                                                     "model": "scripted"}}
    return AgentRunner.func_or_class(settings)


async def test_a_session_through_the_deployment_methods(runner, model):
    model.script(tool_call("files_write", {"path": "a.txt", "content": "x"}), answer("done"))
    created = await runner.create_session({"tools": ["files.write"], "budgets":
                                           {"max_llm_calls": 5}}, "tenant")
    assert created["object"] == "agent.session" and created["status"] == "completed"
    paused = await runner.post_message(created["id"], {"content": "write"}, "tenant")
    call_id = paused["pending_confirmation"]["call_id"]
    refused = await runner.confirm(created["id"], call_id, {"approve": True},
                                   confirmer="k1", may_confirm=False, owner="tenant")
    assert is_error_payload(refused) and refused["status"] == 403
    done = await runner.confirm(created["id"], call_id, {"approve": True},
                                confirmer="k2", may_confirm=True, owner="tenant")
    assert done["answer"] == "done"
    audit = await runner.audit(created["id"], "tenant")
    assert audit["data"][0]["confirmer"] == "k2"
    assert runner.verify_audit_chain()["valid"]
    assert (await runner.delete(created["id"], "tenant"))["status"] == "deleted"


@pytest.mark.parametrize("body, status, param", [
    ({"tools": ["python"], "colour": "red"}, 422, "colour"),
    ({"tools": "python"}, 422, "tools"),
    ({"budgets": {"max_usd": -1}}, 422, "budgets"),
    ({"tools": ["shell"]}, 422, "tools"),
])
async def test_bad_bodies_are_422_payloads(runner, body, status, param):
    result = await runner.create_session(body, None)
    assert is_error_payload(result) and result["status"] == status and result["param"] == param


async def test_errors_cross_the_handle_as_payloads(runner):
    missing = await runner.get("as_nope", None)
    assert is_error_payload(missing) and missing["status"] == 404
    created = await runner.create_session({}, None)
    empty = await runner.post_message(created["id"], {"content": ""}, None)
    assert is_error_payload(empty) and empty["status"] == 422
