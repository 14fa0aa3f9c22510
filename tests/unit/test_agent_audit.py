"""The audit log: a row for every tool call (run, denied, failed, blocked), written before
the tool runs, append-only and hash-chained. Every test runs on SQLite and PostgreSQL."""
from __future__ import annotations

import sqlite3

import psycopg
import pytest

from serve_app.agent.audit import AuditLog, row_hash
from serve_app.agent.tools import Tool, default_registry
from tests.support.agent_env import service
from tests.support.db_helpers import run_writers
from tests.support.scripted_model import answer, tool_call


def audit_path(tmp_path):
    return tmp_path / "agent" / "audit.sqlite3"


def raw_connect(where):
    """A connection of its own, outside the store (another process would see the same)."""
    if isinstance(where, str):
        return psycopg.connect(where, autocommit=True)
    db = sqlite3.connect(where, isolation_level=None)
    return db


def raw_rows(where, sql):
    db = raw_connect(where)
    try:
        return [tuple(row) for row in db.execute(sql).fetchall()]
    finally:
        db.close()


APPEND_ONLY_ERRORS = (sqlite3.DatabaseError, psycopg.Error)


async def test_every_call_has_a_record_including_denied_and_failed(tmp_path, db_url, model, target):
    agent = service(tmp_path, model, database_url=db_url, settings={"http_post_allowlist": [f"127.0.0.1:{target.port}"]})
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


async def test_the_started_row_is_committed_before_the_tool_runs(tmp_path, db_url, model):
    seen = {}

    async def spy(ctx, args):
        # A separate connection (another process would see the same) reads the log.
        seen["rows"] = raw_rows(db_url or audit_path(tmp_path),
                                "SELECT event, tool, decision FROM audit_events")
        return "ok"

    registry = default_registry()
    registry.register(Tool("spy", "Spies.", {"type": "object"}, spy))
    agent = service(tmp_path, model, database_url=db_url, registry=registry)
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


def test_rows_cannot_be_updated_or_deleted_through_the_database(db_target):
    where = db_target("a.sqlite3")
    log = AuditLog(where)
    fill(log, 2)
    db = raw_connect(where)
    with pytest.raises(APPEND_ONLY_ERRORS, match="append-only"):
        db.execute("UPDATE audit_events SET tool = 'x' WHERE seq = 1")
    with pytest.raises(APPEND_ONLY_ERRORS, match="append-only"):
        db.execute("DELETE FROM audit_events WHERE seq = 1")
    if isinstance(where, str):
        with pytest.raises(APPEND_ONLY_ERRORS, match="append-only"):
            db.execute("TRUNCATE audit_events")
    db.close()
    assert log.verify_chain() is None and len(log.events()) == 2


def tamper(where, sql: str) -> None:
    """What someone with raw database access could do: switch the guards off, edit."""
    db = raw_connect(where)
    if isinstance(where, str):
        db.execute("ALTER TABLE audit_events DISABLE TRIGGER USER")
    else:
        db.execute("DROP TRIGGER audit_no_update")
        db.execute("DROP TRIGGER audit_no_delete")
    db.execute(sql)
    db.close()


def test_chain_verification_finds_an_edited_row(db_target):
    where = db_target("a.sqlite3")
    log = AuditLog(where)
    fill(log)
    assert log.verify_chain() is None
    tamper(where, """UPDATE audit_events SET arguments = '{"code": "print(42)"}' WHERE seq = 4""")
    broken = log.verify_chain()
    assert broken == {"seq": 4, "reason": "content does not match its hash"}


def test_chain_verification_finds_a_deleted_row(db_target):
    where = db_target("a.sqlite3")
    log = AuditLog(where)
    fill(log)
    tamper(where, "DELETE FROM audit_events WHERE seq = 3")
    assert log.verify_chain()["seq"] == 4


def test_chain_verification_finds_a_rehashed_row(db_target):
    where = db_target("b.sqlite3")
    log = AuditLog(where)
    fill(log)
    # Editing a row and fixing its own hash still breaks the next row's link.
    row = next(e for e in log.events() if e["seq"] == 2)
    row["arguments"] = raw_rows(where, "SELECT arguments FROM audit_events WHERE seq = 2")[0][0]
    row["tool"] = "files.delete"
    tamper(where, f"UPDATE audit_events SET tool = 'files.delete', hash = '{row_hash(row)}' "
                  "WHERE seq = 2")
    assert log.verify_chain() == {"seq": 3,
                                  "reason": "prev_hash does not match the row before"}


def test_two_writers_keep_one_chain(db_target):
    where = db_target("a.sqlite3")
    first, second = AuditLog(where), AuditLog(where)
    for i in range(10):
        (first if i % 2 else second).append(session_id="s", call_id=f"c{i}", step=i,
                                            event="started", tool="t", decision="auto")
    assert first.verify_chain() is None
    assert [e["seq"] for e in second.events()] == list(range(1, 11))


def test_two_processes_append_at_once_and_keep_one_chain(db_target, tmp_path):
    where = db_target("a.sqlite3")
    AuditLog(where).close()
    run_writers("audit", where, tmp_path, ["p1", "p2"], 60)
    log = AuditLog(where)
    events = log.events()
    assert [e["seq"] for e in events] == list(range(1, 121))
    assert {e["session_id"] for e in events} == {"p1", "p2"}
    assert log.verify_chain() is None
    # The two writers really interleaved (otherwise this proves little).
    sessions = [e["session_id"] for e in events]
    assert sum(a != b for a, b in zip(sessions, sessions[1:])) > 1
