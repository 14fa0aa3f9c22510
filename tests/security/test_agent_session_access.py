"""Class 9: a session belongs to the key that created it; other keys of the tenant need a
grant; each LLM step is admitted under the key that drives it (the scripted model records
the `metadata.billing_key_id` the gateway's LLM port admits the step under)."""
from __future__ import annotations

import pytest

from serve_app.errors import ApiError
from tests.support.agent_env import agent_service, principal, scripted_model
from tests.support.scripted_model import answer, tool_call

__all__ = ["agent_service", "scripted_model"]

ALICE = principal("key-alice")
BOB = principal("key-bob")  # same tenant, no rights until granted
MALLORY = principal("key-mallory", tenant="t2")
OPERATOR = principal("key-operator", can_confirm=True)



def billed_keys(model) -> list[str | None]:
    return [(r.get("metadata") or {}).get("billing_key_id") for r in model.requests]


async def expect(status: int, call) -> ApiError:
    with pytest.raises(ApiError) as error:
        await call
    assert error.value.status == status, error.value.message
    return error.value


async def test_another_key_of_the_tenant_cannot_drive_or_read(agent, scripted_model):
    session = await agent.create_session(principal=ALICE)
    scripted_model.script(answer("should not run"))
    await expect(403, agent.post_message(session["id"], "hi", principal=BOB))
    await expect(403, agent.get(session["id"], principal=BOB))
    await expect(403, agent.audit(session["id"], principal=BOB))
    await expect(403, agent.delete(session["id"], principal=BOB))
    assert scripted_model.requests == []  # nothing was admitted or billed
    for call in (agent.get(session["id"], principal=MALLORY),
                 agent.post_message(session["id"], "hi", principal=MALLORY)):
        await expect(404, call)


async def test_a_drive_grant_lets_a_key_drive_under_its_own_key(agent, scripted_model):
    session = await agent.create_session(principal=ALICE)
    scripted_model.script(answer("for alice"))
    await agent.post_message(session["id"], "hi", principal=ALICE)
    await agent.grant(session["id"], "key-bob", "drive", principal=ALICE)
    scripted_model.requests.clear()
    scripted_model.script(answer("for bob"))
    result = await agent.post_message(session["id"], "hello", principal=BOB)
    assert result["answer"] == "for bob"
    assert billed_keys(scripted_model) == ["key-bob"]  # admitted under Bob, not Alice
    scripted_model.script(answer("alice again"))
    await agent.post_message(session["id"], "me", principal=ALICE)
    assert billed_keys(scripted_model) == ["key-alice"]


async def test_read_grants_do_not_drive_and_only_the_creator_grants(agent, scripted_model):
    session = await agent.create_session(principal=ALICE)
    await agent.grant(session["id"], "key-bob", "read", principal=ALICE)
    assert (await agent.get(session["id"], principal=BOB))["id"] == session["id"]
    await expect(403, agent.post_message(session["id"], "hi", principal=BOB))
    await expect(403, agent.grant(session["id"], "key-bob", "drive", principal=BOB))
    await expect(403, agent.grant(session["id"], "key-eve", "drive", principal=BOB))
    await agent.grant(session["id"], "key-bob", None, principal=ALICE)
    await expect(403, agent.get(session["id"], principal=BOB))
    await expect(409, agent.grant(session["id"], "key-alice", "read", principal=ALICE))


async def test_the_client_cannot_name_who_pays(agent, scripted_model):
    session = await agent.create_session(principal=ALICE,
                                         metadata={"billing_key_id": "key-victim"})
    assert "billing_key_id" not in session["metadata"]
    scripted_model.script(answer("ok"))
    await agent.post_message(session["id"], "hi", principal=ALICE)
    assert billed_keys(scripted_model) == ["key-alice"]


async def test_steps_after_a_confirmation_are_billed_to_the_requester(agent, scripted_model):
    session = await agent.create_session(principal=ALICE)
    await agent.grant(session["id"], "key-bob", "drive", principal=ALICE)
    scripted_model.script(tool_call("files_write", {"path": "a.txt", "content": "x"}),
                          answer("written"))
    paused = await agent.post_message(session["id"], "write", principal=BOB)
    assert paused["pending_confirmation"]["requested_by"] == "key-bob"
    done = await agent.confirm(session["id"], paused["pending_confirmation"]["call_id"],
                               approve=True, principal=OPERATOR)
    assert done["answer"] == "written"
    assert billed_keys(scripted_model) == ["key-bob", "key-bob"]  # never the operator


async def test_confirmers_of_the_tenant_may_review_but_not_drive(agent, scripted_model):
    session = await agent.create_session(principal=ALICE)
    assert (await agent.get(session["id"], principal=OPERATOR))["id"] == session["id"]
    await expect(403, agent.post_message(session["id"], "hi", principal=OPERATOR))
    outsider = principal("key-op2", tenant="t2", can_confirm=True)
    await expect(404, agent.get(session["id"], principal=outsider))
