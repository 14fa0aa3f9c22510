"""Append-only, hash-chained audit log of every tool call (SQLite with WAL and
synchronous=FULL, or PostgreSQL shared by the replicas of every node).

Storage is an event log, never updated: each tool call writes a `started` row (decision
auto/approved/denied/expired/blocked, requester: the key whose run asked for the call,
confirmer: the key that approved or denied it, arguments) BEFORE the tool runs and a
`finished` row (result summary, duration, error) after it; an irreversible call also writes
a `requested` row (decision `pending`) when the session pauses for confirmation. Triggers
refuse UPDATE and DELETE (PostgreSQL: TRUNCATE too). `calls(session_id)` folds the events into one record per call.

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
from typing import Any

from serve_app.database import Dialects, Target, Transaction, migrate, open_database

GENESIS = "0" * 64
DECISIONS = ("pending", "auto", "approved", "denied", "expired", "blocked")
EVENTS = ("requested", "started", "finished")
# Columns covered by the hash, in order (seq and prev_hash included).
_HASHED = ("seq", "session_id", "call_id", "step", "event", "tool", "arguments", "decision",
           "confirmer", "result_summary", "duration_ms", "error", "created_at", "prev_hash")
# Columns added later: hashed only when set, so rows written before they existed verify.
_HASHED_OPTIONAL = ("requester",)

COMPONENT = "agent_audit"
_APPEND_ONLY = "audit log is append-only"
_COLUMNS_V1 = """
    session_id TEXT NOT NULL,
    call_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    event TEXT NOT NULL,
    tool TEXT NOT NULL,
    arguments TEXT,
    decision TEXT,
    confirmer TEXT,
    result_summary TEXT,
    duration_ms DOUBLE PRECISION,
    error TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
)"""
MIGRATIONS = [
    [
        # seq is computed by append (last + 1), never by the database; on SQLite it stays
        # the rowid alias it always was.
        Dialects(sqlite="CREATE TABLE audit_events (seq INTEGER PRIMARY KEY," + _COLUMNS_V1,
                 postgresql="CREATE TABLE audit_events (seq BIGINT PRIMARY KEY," + _COLUMNS_V1),
        "CREATE INDEX audit_by_session ON audit_events (session_id, seq)",
        Dialects(
            sqlite="CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit_events "
                   f"BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END",
            postgresql="CREATE FUNCTION audit_events_append_only() RETURNS trigger "
                       f"LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION '{_APPEND_ONLY}'; END $$"),
        Dialects(
            sqlite="CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit_events "
                   f"BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END",
            postgresql="CREATE TRIGGER audit_no_update_delete BEFORE UPDATE OR DELETE ON "
                       "audit_events FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()"),
        Dialects(
            sqlite="SELECT 1",  # SQLite has no TRUNCATE
            postgresql="CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit_events "
                       "FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only()"),
    ],
    ["ALTER TABLE audit_events ADD COLUMN requester TEXT"],
]


def _legacy_version(tx: Transaction) -> int:
    """A log from before versioned migrations (CREATE IF NOT EXISTS): version 1 if the
    table is there, 2 if it has the requester column already."""
    if not tx.table_exists("audit_events"):
        return 0
    return 2 if "requester" in tx.columns("audit_events") else 1


def row_hash(row: dict[str, Any]) -> str:
    values: list[Any] = [row.get(column) for column in _HASHED]
    values += [[column, row[column]] for column in _HASHED_OPTIONAL
               if row.get(column) is not None]
    content = json.dumps(values, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(content.encode()).hexdigest()


class AuditLog:
    def __init__(self, target: Target, *, clock: Callable[[], float] = time.time,
                 summary_chars: int = 2000) -> None:
        """`target`: a SQLite file path, a postgresql:// URL, or a shared `Database`."""
        self.clock = clock
        self.summary_chars = summary_chars
        self._lock = threading.Lock()
        self._db, self._owns_db = open_database(target, name=COMPONENT)
        self.path = self._db.path  # the SQLite file (None on PostgreSQL)
        migrate(self._db, COMPONENT, MIGRATIONS, legacy=_legacy_version)

    def close(self) -> None:
        if self._owns_db:
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
            # float: what the DOUBLE PRECISION column gives back, so the hash verifies.
            "error": _cut(error, self.summary_chars), "created_at": float(self.clock()),
        }
        columns = (*_HASHED, *_HASHED_OPTIONAL, "hash")
        insert = (f"INSERT INTO audit_events ({', '.join(columns)}) "
                  f"VALUES ({', '.join('?' for _ in columns)})")
        with self._lock, self._db.transaction() as tx:
            # One writer at a time across processes (replicas), so the chain never forks:
            # SQLite's BEGIN IMMEDIATE takes the write lock first; PostgreSQL locks the
            # table against other writers (readers go on) until the commit.
            tx.lock_exclusive("audit_events")
            last = tx.fetchone("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
            row["seq"] = (last["seq"] + 1) if last else 1
            row["prev_hash"] = last["hash"] if last else GENESIS
            row["hash"] = row_hash(row)
            tx.execute(insert, [row[c] for c in columns])
        return row["seq"]

    # ------------------------------------------------------------------ reading
    def events(self, session_id: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            if session_id is None:
                rows = self._db.fetchall("SELECT * FROM audit_events ORDER BY seq")
            else:
                rows = self._db.fetchall(
                    "SELECT * FROM audit_events WHERE session_id = ? ORDER BY seq",
                    (session_id,))
        return [_decode(row) for row in rows]

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
            rows = self._db.fetchall("SELECT * FROM audit_events ORDER BY seq")
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
            row = self._db.fetchone(
                "SELECT hash FROM audit_events ORDER BY seq DESC LIMIT 1")
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
