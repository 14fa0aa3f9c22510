"""The audit log: a row for every tool call (run, denied, failed, blocked), written before
the tool runs, append-only and hash-chained."""
from __future__ import annotations

import sqlite3

import pytest

from serve_app.agent.audit import AuditLog
from serve_app.agent.tools import Tool, default_registry
from tests.support.agent_env import service
from tests.support.scripted_model import answer, tool_call


def audit_path(tmp_path):
    return tmp_path / "agent" / "audit.sqlite3"


async def test_every_call_has_a_record_including_denied_and_failed(tmp_path, model, target):
    agent = service(tmp_path, model, settings={"http_post_allowlist": [f"127.0.0.1:{target.port}"]})
    model.script(
        tool_call("files_list", {}),                          # succeeds
        tool_call("files_read", {"path": "missing.txt"}),     # tool error
        tool_call("files_read", {"nope": 1}),                 # invalid arguments
        tool_call("files_read", "{not json"),                 # unparsable arguments
        tool_call("rm_rf", {"path": "/"}),                    # unknown tool
        tool_call("python", {"code": "raise SystemExit(3)"}),  # program fails
        tool_call("http_post", {"url": f"{target.url}/x"}),   # irreversible -> denied
        answer("done"))
    session = await agent.create_session()
    paused = await agent.post_message(session["id"], "go")
    await agent.confirm(session["id"], paused["pending_confirmation"]["call_id"],
                        approve=False, confirmer="admin", may_confirm=True)
    calls = (await agent.audit(session["id"]))["data"]
    assert [(c["tool"], c["decision"], c["status"]) for c in calls] == [
        ("files.list", "auto", "succeeded"),
        ("files.read", "auto", "failed"),
        ("files.read", "auto", "failed"),
        ("files.read", "auto", "failed"),
        ("rm_rf", "auto", "failed"),
        ("python", "auto", "failed"),
        ("http.post", "denied", "failed"),
    ]
    assert "not a file" in calls[1]["error"]
    assert "required property" in calls[2]["error"] or "Additional" in calls[2]["error"]
    assert "not valid JSON" in calls[3]["error"] and calls[3]["arguments"] == "{not json"
    assert "unknown tool" in calls[4]["error"]
    assert "exit code 3" in calls[5]["error"] and calls[5]["duration_ms"] > 0
    assert calls[6]["confirmer"] == "admin"
    assert [c["step"] for c in calls] == [1, 2, 3, 4, 5, 6, 7]
    assert all(c["arguments"] is not None for c in calls)
    assert agent.verify_audit_chain() is None
    assert target.received == []


async def test_the_started_row_is_committed_before_the_tool_runs(tmp_path, model):
    seen = {}

    async def spy(ctx, args):
        # A separate connection (another process would see the same) reads the log.
        db = sqlite3.connect(audit_path(tmp_path))
        seen["rows"] = db.execute("SELECT event, tool, decision FROM audit_events").fetchall()
        db.close()
        return "ok"

    registry = default_registry()
    registry.register(Tool("spy", "Spies.", {"type": "object"}, spy))
    agent = service(tmp_path, model, registry=registry)
    model.script(tool_call("spy", {}), answer("done"))
    session = await agent.create_session(tools=["spy"])
    await agent.post_message(session["id"], "go")
    assert seen["rows"] == [("started", "spy", "auto")]
    events = [e["event"] for e in agent.audit_log.events(session["id"])]
    assert events == ["started", "finished"]


def fill(log: AuditLog, n: int = 6) -> None:
    for i in range(n):
        log.append(session_id="s", call_id=f"c{i}", step=i, event="started", tool="python",
                   arguments={"code": f"print({i})"}, decision="auto")


def test_rows_cannot_be_updated_or_deleted_through_sqlite(tmp_path):
    log = AuditLog(tmp_path / "a.sqlite3")
    fill(log, 2)
    db = sqlite3.connect(tmp_path / "a.sqlite3")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE audit_events SET tool = 'x' WHERE seq = 1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit_events WHERE seq = 1")


def tamper(path, sql: str) -> None:
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("DROP TRIGGER audit_no_delete")
    db.execute(sql)
    db.commit()
    db.close()


def test_chain_verification_finds_an_edited_row(tmp_path):
    path = tmp_path / "a.sqlite3"
    log = AuditLog(path)
    fill(log)
    assert log.verify_chain() is None
    tamper(path, """UPDATE audit_events SET arguments = '{"code": "print(42)"}' WHERE seq = 4""")
    broken = log.verify_chain()
    assert broken == {"seq": 4, "reason": "content does not match its hash"}


def test_chain_verification_finds_a_deleted_or_rehashed_row(tmp_path):
    path = tmp_path / "a.sqlite3"
    log = AuditLog(path)
    fill(log)
    tamper(path, "DELETE FROM audit_events WHERE seq = 3")
    assert log.verify_chain()["seq"] == 4

    path2 = tmp_path / "b.sqlite3"
    log2 = AuditLog(path2)
    fill(log2)
    # Editing a row and fixing its own hash still breaks the next row's link.
    from serve_app.agent.audit import row_hash

    db = sqlite3.connect(path2)
    db.row_factory = sqlite3.Row
    row = dict(db.execute("SELECT * FROM audit_events WHERE seq = 2").fetchone())
    row["tool"] = "files.delete"
    db.close()
    tamper(path2, f"UPDATE audit_events SET tool = 'files.delete', hash = '{row_hash(row)}' "
                  "WHERE seq = 2")
    assert log2.verify_chain() == {"seq": 3,
                                   "reason": "prev_hash does not match the row before"}


def test_two_writers_keep_one_chain(tmp_path):
    path = tmp_path / "a.sqlite3"
    first, second = AuditLog(path), AuditLog(path)
    for i in range(10):
        (first if i % 2 else second).append(session_id="s", call_id=f"c{i}", step=i,
                                            event="started", tool="t", decision="auto")
    assert first.verify_chain() is None
    assert [e["seq"] for e in second.events()] == list(range(1, 11))
