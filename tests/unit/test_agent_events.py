"""The agent's tool-call events (metrics), derived from the audit rows the loop writes:
each call counted once with its outcome, each confirmation decision counted, the same in
the audit log."""
from __future__ import annotations

import pytest

from serve_app.agent.events import AgentEvents
from tests.support.agent_env import FakeClock, service
from tests.support.scripted_model import answer, tool_call


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.confirmations: list[tuple[str, str]] = []

    def tool_call(self, tool: str, outcome: str) -> None:
        self.calls.append((tool, outcome))

    def confirmation(self, tool: str, decision: str) -> None:
        self.confirmations.append((tool, decision))


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def agent(tmp_path, model, clock, recorder):
    svc = service(tmp_path, model, clock=clock, events=AgentEvents(recorder),
                  settings={"confirmation_ttl_s": 60})
    yield svc
    svc.close()


def write(path: str = "a.txt") -> dict:
    return tool_call("files_write", {"path": path, "content": "x"})


async def test_auto_calls_count_ok_and_error(agent, model, recorder):
    model.script(tool_call("files_list", {}), tool_call("files_read", {"path": "nope.txt"}),
                 tool_call("files_read", "{not json"), answer("done"))
    session = await agent.create_session(owner="t1")
    result = await agent.post_message(session["id"], "look around", owner="t1")
    assert result["status"] == "completed"
    assert recorder.calls == [("files.list", "ok"), ("files.read", "error"),
                              ("files.read", "error")]
    assert recorder.confirmations == []


async def test_confirmations_approved_denied_and_expired(agent, model, recorder, clock):
    model.script(write("one.txt"), answer("written"))
    session = await agent.create_session(owner="t1")
    paused = await agent.post_message(session["id"], "write", owner="t1")
    call = paused["pending_confirmation"]["call_id"]
    assert recorder.confirmations == [("files.write", "requested")] and recorder.calls == []
    await agent.confirm(session["id"], call, approve=True, confirmer="op", may_confirm=True)
    assert recorder.confirmations[-1] == ("files.write", "approved")
    assert recorder.calls == [("files.write", "ok")]

    model.script(write("two.txt"), answer("fine"))
    paused = await agent.post_message(session["id"], "again", owner="t1")
    await agent.confirm(session["id"], paused["pending_confirmation"]["call_id"],
                        approve=False, confirmer="op", may_confirm=True)
    assert recorder.confirmations[-2:] == [("files.write", "requested"),
                                           ("files.write", "denied")]
    assert recorder.calls[-1] == ("files.write", "denied")

    model.script(write("three.txt"), answer("never"))
    await agent.post_message(session["id"], "once more", owner="t1")
    clock.advance(61)
    assert (await agent.get(session["id"], owner="t1"))["status"] == "completed"
    assert recorder.confirmations[-1] == ("files.write", "expired")
    assert recorder.calls[-1] == ("files.write", "expired")
    # The counts agree with the audit log: one finished call per counted call.
    audit = (await agent.audit(session["id"]))["data"]
    assert len(audit) == len(recorder.calls) == 3


async def test_blocked_calls_and_a_failing_sink(agent, model, recorder):
    model.script(tool_call("files_list", {}), tool_call("files_list", {}), answer("no"))
    session = await agent.create_session(owner="t1", budgets={"max_tool_calls": 1})
    result = await agent.post_message(session["id"], "list twice", owner="t1")
    assert result["status"] == "stopped"
    assert recorder.calls == [("files.list", "ok"), ("files.list", "blocked")]

    def broken(tool: str, outcome: str) -> None:
        raise RuntimeError("metrics backend down")

    recorder.tool_call = broken  # a failing hook never reaches the loop
    model.script(tool_call("files_list", {}), answer("listed"))
    other = await agent.create_session(owner="t1")
    assert (await agent.post_message(other["id"], "list", owner="t1"))["status"] == "completed"


def test_a_finished_row_without_its_start_is_an_interrupted_call(recorder):
    events = AgentEvents(recorder)
    events.audited("finished", "python", "call_1", {"error": "interrupted"})
    assert recorder.calls == [("python", "interrupted")]
