"""Append-only, hash-chained audit log of every tool call (SQLite, WAL, synchronous=FULL).

Storage is an event log, never updated: each tool call writes a `started` row (decision
auto/approved/denied/expired/blocked, requester: the key whose run asked for the call,
confirmer: the key that approved or denied it, arguments) BEFORE the tool runs and a
`finished` row (result summary, duration, error) after it; an irreversible call also writes
a `requested` row (decision `pending`) when the session pauses for confirmation. Triggers
refuse UPDATE and DELETE. `calls(session_id)` folds the events into one record per call.

Each row's hash is sha256 over its own content and the previous row's hash, so editing,
inserting or deleting a row in the middle breaks the chain at that row: `verify_chain()`
finds it. What the chain does not prove: that the newest rows were not cut off (keep the
head hash elsewhere for that), nor anything against someone who rewrites the whole chain
from the edited row on (the hash is not keyed).
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve_app.sqlite_db import connect

GENESIS = "0" * 64
DECISIONS = ("pending", "auto", "approved", "denied", "expired", "blocked")
EVENTS = ("requested", "started", "finished")
# Columns covered by the hash, in order (seq and prev_hash included).
_HASHED = ("seq", "session_id", "call_id", "step", "event", "tool", "arguments", "decision",
           "confirmer", "result_summary", "duration_ms", "error", "created_at", "prev_hash")
# Columns added later: hashed only when set, so rows written before they existed verify.
_HASHED_OPTIONAL = ("requester",)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_events (
    seq INTEGER PRIMARY KEY,
    session_id TEXT NOT NULL,
    call_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    event TEXT NOT NULL,
    tool TEXT NOT NULL,
    arguments TEXT,
    decision TEXT,
    confirmer TEXT,
    result_summary TEXT,
    duration_ms REAL,
    error TEXT,
    created_at REAL NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    requester TEXT
);
CREATE INDEX IF NOT EXISTS audit_by_session ON audit_events (session_id, seq);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
"""


def row_hash(row: dict[str, Any]) -> str:
    values: list[Any] = [row.get(column) for column in _HASHED]
    values += [[column, row[column]] for column in _HASHED_OPTIONAL
               if row.get(column) is not None]
    content = json.dumps(values, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(content.encode()).hexdigest()


class AuditLog:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time,
                 summary_chars: int = 2000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.summary_chars = summary_chars
        self._lock = threading.Lock()
        self._db = connect(self.path, synchronous="FULL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(audit_events)")}
        if "requester" not in columns:  # a log created before requesters were recorded
            self._db.execute("ALTER TABLE audit_events ADD COLUMN requester TEXT")

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ writing
    def append(self, *, session_id: str, call_id: str, step: int, event: str, tool: str,
               arguments: Any = None, decision: str | None = None,
               confirmer: str | None = None, requester: str | None = None,
               result_summary: str | None = None,
               duration_ms: float | None = None, error: str | None = None) -> int:
        """Append one event durably (committed before returning); returns its seq."""
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        if decision is not None and decision not in DECISIONS:
            raise ValueError(f"unknown audit decision {decision!r}")
        row: dict[str, Any] = {
            "session_id": session_id, "call_id": call_id, "step": step, "event": event,
            "tool": tool,
            "arguments": None if arguments is None else json.dumps(
                arguments, sort_keys=True, ensure_ascii=False, default=str),
            "decision": decision, "confirmer": confirmer, "requester": requester,
            "result_summary": _cut(result_summary, self.summary_chars),
            "duration_ms": None if duration_ms is None else round(float(duration_ms), 3),
            "error": _cut(error, self.summary_chars), "created_at": self.clock(),
        }
        with self._lock:
            # BEGIN IMMEDIATE takes the write lock first: appends from several replicas
            # (processes) are serialised, so the chain never forks.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                last = self._db.execute(
                    "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1").fetchone()
                row["seq"] = (last["seq"] + 1) if last else 1
                row["prev_hash"] = last["hash"] if last else GENESIS
                row["hash"] = row_hash(row)
                columns = (*_HASHED, *_HASHED_OPTIONAL, "hash")
                self._db.execute(
                    f"INSERT INTO audit_events ({', '.join(columns)}) "
                    f"VALUES ({', '.join('?' for _ in columns)})",
                    [row[c] for c in columns])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return row["seq"]

    # ------------------------------------------------------------------ reading
    def events(self, session_id: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            if session_id is None:
                rows = self._db.execute("SELECT * FROM audit_events ORDER BY seq").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM audit_events WHERE session_id = ? ORDER BY seq",
                    (session_id,)).fetchall()
        return [_decode(dict(row)) for row in rows]

    def calls(self, session_id: str) -> list[dict[str, Any]]:
        """One record per tool call, in the order the calls were first logged."""
        records: dict[str, dict[str, Any]] = {}
        for event in self.events(session_id):
            record = records.setdefault(event["call_id"], {
                "call_id": event["call_id"], "session_id": event["session_id"],
                "step": event["step"], "tool": event["tool"],
                "arguments": event["arguments"], "decision": None, "confirmer": None,
                "requester": None,
                "result_summary": None, "duration_ms": None, "error": None,
                "requested_at": None, "started_at": None, "finished_at": None,
                "status": None, "seqs": []})
            record["seqs"].append(event["seq"])
            if event.get("requester"):
                record["requester"] = event["requester"]
            if event["event"] == "requested":
                record["requested_at"] = event["created_at"]
                record["decision"] = event["decision"]
                record["status"] = "awaiting_confirmation"
            elif event["event"] == "started":
                record["started_at"] = event["created_at"]
                record["decision"] = event["decision"]
                record["confirmer"] = event["confirmer"]
                record["status"] = "running"
            else:
                record["finished_at"] = event["created_at"]
                record["result_summary"] = event["result_summary"]
                record["duration_ms"] = event["duration_ms"]
                record["error"] = event["error"]
                record["status"] = "failed" if event["error"] else "succeeded"
        return list(records.values())

    def verify_chain(self) -> dict[str, Any] | None:
        """None when intact, else the first broken row: {'seq', 'reason'}."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM audit_events ORDER BY seq").fetchall()
        previous = GENESIS
        expected_seq = 1
        for raw in rows:
            row = dict(raw)
            if row["seq"] != expected_seq:
                return {"seq": row["seq"], "reason": f"row {expected_seq} is missing"}
            if row["prev_hash"] != previous:
                return {"seq": row["seq"], "reason": "prev_hash does not match the row before"}
            if row_hash(row) != row["hash"]:
                return {"seq": row["seq"], "reason": "content does not match its hash"}
            previous = row["hash"]
            expected_seq += 1
        return None

    def head(self) -> str:
        """Hash of the newest row (store it elsewhere to detect a cut-off tail)."""
        with self._lock:
            row = self._db.execute(
                "SELECT hash FROM audit_events ORDER BY seq DESC LIMIT 1").fetchone()
        return row["hash"] if row else GENESIS


def _cut(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + f"... [{len(text) - limit} more characters]"


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    if row.get("arguments") is not None:
        try:
            row["arguments"] = json.loads(row["arguments"])
        except json.JSONDecodeError:
            pass
    return row
