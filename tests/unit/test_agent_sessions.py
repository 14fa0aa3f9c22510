"""Sessions live in SQLite or PostgreSQL (every test runs on both): a new runner instance (restart, another replica) resumes them;
leases and versions keep two replicas from running the same step."""
from __future__ import annotations

import json

import pytest

from serve_app.agent.sessions import Session, SessionConflict, SessionStore
from serve_app.errors import ApiError
from tests.support.agent_env import service
from tests.support.scripted_model import answer, failure, tool_call


def allow(target):
    return {"http_post_allowlist": [f"127.0.0.1:{target.port}"]}


async def test_a_paused_session_survives_a_restart(tmp_path, db_url, model, target):
    target.received.clear()
    model.script(tool_call("http_post", {"url": f"{target.url}/a", "body": "x"}))
    first = service(tmp_path, model, database_url=db_url, settings=allow(target))
    session = await first.create_session(owner="t1", goal="post x")
    paused = await first.post_message(session["id"], "please", owner="t1")
    first.close()  # the replica goes away

    model.script(answer("posted"))
    second = service(tmp_path, model, database_url=db_url, settings=allow(target))
    view = await second.get(session["id"], owner="t1")
    assert view["status"] == "awaiting_confirmation"
    assert view["messages"] == paused["messages"]
    done = await second.confirm(session["id"], paused["pending_confirmation"]["call_id"],
                                approve=True, confirmer="admin", may_confirm=True, owner="t1")
    assert done["answer"] == "posted" and len(target.received) == 1
    assert done["usage"]["llm_calls"] == 2 and done["usage"]["tool_calls"] == 1
    assert "Goal: post x" in done["messages"][0]["content"]
    # the model saw the whole history, restored from disk
    assert [m["role"] for m in model.requests[-1]["messages"]] == [
        "system", "user", "assistant", "tool"]
    assert second.verify_audit_chain() is None


async def test_a_call_interrupted_by_a_crash_is_never_repeated(tmp_path, db_url, model):
    model.script(tool_call("files_list", {}), answer("first"))
    agent = service(tmp_path, model, database_url=db_url)
    session = await agent.create_session()
    await agent.post_message(session["id"], "go")
    # Simulate a replica that died while running a call: in flight, still queued.
    stored = agent.store.load(session["id"])
    call = {"id": "call_crashed", "type": "function",
            "function": {"name": "files_write", "arguments": json.dumps(
                {"path": "x", "content": "y"})}}
    stored.messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    stored.queue = [call]
    stored.in_flight = {"call_id": "call_crashed", "tool": "files.write", "step": 2}
    stored.status = "running"
    agent.store.save(stored)
    agent.close()

    model.script(answer("recovered"))
    restarted = service(tmp_path, model, database_url=db_url)
    result = await restarted.post_message(session["id"], "are you there?")
    assert result["answer"] == "recovered"
    interrupted = json.loads(next(m["content"] for m in result["messages"]
                                  if m.get("tool_call_id") == "call_crashed"))
    assert "unknown" in interrupted["error"]
    record = [c for c in (await restarted.audit(session["id"]))["data"]
              if c["call_id"] == "call_crashed"][0]
    assert "interrupted" in record["error"]
    workspace = tmp_path / "agent" / "workspaces" / session["id"]
    assert not (workspace / "x").exists()


async def test_a_session_held_by_another_replica_is_busy(tmp_path, db_url, model):
    agent = service(tmp_path, model, database_url=db_url)
    session = await agent.create_session()
    assert agent.store.acquire(session["id"], "other-replica:1", ttl_s=60)
    with pytest.raises(ApiError) as busy:
        await agent.post_message(session["id"], "hi")
    assert busy.value.status == 409 and busy.value.code == "session_busy"
    agent.store.release(session["id"], "other-replica:1")
    model.script(answer("hello"))
    assert (await agent.post_message(session["id"], "hi"))["answer"] == "hello"


def test_stale_writes_are_refused(db_target):
    store = SessionStore(db_target("s.sqlite3"))
    store.create(Session(id="s1", owner=None, model="m", tools=[], limits={}))
    a, b = store.load("s1"), store.load("s1")
    a.status = "running"
    store.save(a)
    b.status = "completed"
    with pytest.raises(SessionConflict):
        store.save(b)
    assert store.load("s1").status == "running"


def test_leases_expire(db_target):
    clock = [100.0]
    store = SessionStore(db_target("s.sqlite3"), clock=lambda: clock[0])
    store.create(Session(id="s1", owner=None, model="m", tools=[], limits={}))
    assert store.acquire("s1", "a", ttl_s=10)
    assert not store.acquire("s1", "b", ttl_s=10)
    clock[0] += 11
    assert store.acquire("s1", "b", ttl_s=10)


async def test_sessions_are_private_to_their_owner(tmp_path, db_url, model):
    agent = service(tmp_path, model, database_url=db_url)
    session = await agent.create_session(owner="tenant-a")
    for call in (agent.get(session["id"], owner="tenant-b"),
                 agent.audit(session["id"], owner="tenant-b"),
                 agent.post_message(session["id"], "hi", owner="tenant-b"),
                 agent.delete(session["id"], owner="tenant-b")):
        with pytest.raises(ApiError) as hidden:
            await call
        assert hidden.value.status == 404


async def test_an_llm_failure_leaves_a_resumable_session(tmp_path, db_url, model):
    model.script(failure(503))
    agent = service(tmp_path, model, database_url=db_url)
    session = await agent.create_session()
    with pytest.raises(ApiError) as failed:
        await agent.post_message(session["id"], "hi")
    assert failed.value.status == 502
    view = await agent.get(session["id"])
    assert view["status"] == "error" and view["last_error"]
    model.script(answer("back"))
    assert (await agent.post_message(session["id"], "again"))["answer"] == "back"


async def test_delete_removes_state_and_workspace_but_keeps_the_audit(tmp_path, db_url, model):
    model.script(tool_call("files_list", {}), answer("ok"))
    agent = service(tmp_path, model, database_url=db_url)
    session = await agent.create_session()
    await agent.post_message(session["id"], "go")
    workspace = tmp_path / "agent" / "workspaces" / session["id"]
    assert workspace.is_dir()
    deleted = await agent.delete(session["id"])
    assert deleted["status"] == "deleted" and deleted["messages"] == []
    assert not workspace.exists()
    assert len((await agent.audit(session["id"]))["data"]) == 1
    with pytest.raises(ApiError) as gone:
        await agent.post_message(session["id"], "hi")
    assert gone.value.status == 409 and gone.value.code == "session_deleted"


async def test_unknown_tools_and_sessions_are_client_errors(tmp_path, db_url, model):
    agent = service(tmp_path, model, database_url=db_url)
    with pytest.raises(ApiError) as bad_tool:
        await agent.create_session(tools=["python", "shell"])
    assert bad_tool.value.status == 422 and bad_tool.value.param == "tools"
    session = await agent.create_session(tools=["files_read", "files.read"])
    assert [t["name"] for t in session["tools"]] == ["files.read"]
    with pytest.raises(ApiError) as missing:
        await agent.get("as_missing")
    assert missing.value.status == 404


async def test_the_model_only_sees_the_session_tools_by_wire_name(tmp_path, db_url, model):
    model.script(tool_call("python", {"code": "print(1)"}), answer("no python"))
    agent = service(tmp_path, model, database_url=db_url)
    session = await agent.create_session(tools=["files.read", "files.list"])
    result = await agent.post_message(session["id"], "run python")
    names = [t["function"]["name"] for t in model.requests[0]["tools"]]
    assert names == ["files_read", "files_list"]
    refused = json.loads(result["messages"][3]["content"])
    assert "unknown tool 'python'" in refused["error"]


def test_two_replicas_race_for_one_lease_and_one_save(db_target):
    """Two stores (replicas) on one database: only one wins the lease, only one save of
    the same version lands, from many threads at once."""
    import threading

    stores = [SessionStore(db_target("s.sqlite3")) for _ in range(2)]
    stores[0].create(Session(id="s1", owner=None, model="m", tools=[], limits={}))
    barrier = threading.Barrier(8)
    won: list[str] = []
    saved: list[str] = []

    def contend(n: int) -> None:
        store = stores[n % 2]
        loaded = store.load("s1")
        barrier.wait()
        if store.acquire("s1", f"holder-{n}", ttl_s=60):
            won.append(f"holder-{n}")
        try:
            loaded.status = f"by-{n}"
            store.save(loaded)
            saved.append(f"by-{n}")
        except SessionConflict:
            pass

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and stores[1].lease("s1")[0] == won[0]
    assert len(saved) == 1 and stores[1].load("s1").status == saved[0]
    assert stores[0].load("s1").version == 2
