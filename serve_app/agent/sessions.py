"""Agent sessions persisted in SQLite (WAL, synchronous=FULL) or PostgreSQL (shared by the
replicas of every node), so any replica can resume a session and a restart loses nothing.

Two guards keep replicas apart:
- a lease (`acquire`/`release`): only the holder runs the session's steps; a lease that
  outlives its holder (crash) expires and can be taken over;
- optimistic concurrency: every save names the version it read and fails with
  `SessionConflict` if anyone saved in between.
Both are one `UPDATE ... WHERE` whose rowcount says who won: atomic on both backends (on
PostgreSQL a concurrent UPDATE waits for the row lock, then re-checks the WHERE).
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from serve_app.database import Target, Transaction, migrate, open_database

RUNNING = "running"
AWAITING = "awaiting_confirmation"
COMPLETED = "completed"
ERROR = "error"  # the last run failed upstream (LLM unavailable); a new message resumes
STOPPED = "stopped"  # a budget or guardrail stop; final
DELETED = "deleted"  # final
STATUSES = (RUNNING, AWAITING, COMPLETED, ERROR, STOPPED, DELETED)

COMPONENT = "agent_sessions"
MIGRATIONS = [
    [
        """CREATE TABLE agent_sessions (
            id TEXT PRIMARY KEY,
            owner TEXT,
            status TEXT NOT NULL,
            version BIGINT NOT NULL,
            lease_owner TEXT,
            lease_until DOUBLE PRECISION,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            state TEXT NOT NULL
        )""",
        "CREATE INDEX agent_sessions_owner ON agent_sessions (owner, created_at)",
    ],
]


def _legacy_version(tx: Transaction) -> int:
    """A store from before versioned migrations (CREATE IF NOT EXISTS) is at version 1."""
    return 1 if tx.table_exists("agent_sessions") else 0


class SessionConflict(Exception):
    """Someone else saved the session since it was loaded (or holds its lease)."""


@dataclass
class Session:
    id: str
    owner: str | None
    model: str
    tools: list[str]
    limits: dict[str, Any]
    status: str = COMPLETED
    usage: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    # The assistant turn's tool calls not handled yet (OpenAI tool_call dicts).
    queue: list[dict[str, Any]] = field(default_factory=list)
    # The irreversible call waiting for a human: call_id, tool, arguments, reason,
    # step, requested_at, expires_at.
    pending: dict[str, Any] | None = None
    # The call being executed right now; found set after a crash -> outcome unknown.
    in_flight: dict[str, Any] | None = None
    loop_counts: dict[str, int] = field(default_factory=dict)
    step: int = 0  # LLM calls made so far; tool calls carry the step that asked for them
    stop: dict[str, str] | None = None  # {"reason", "detail"}
    last_error: str | None = None
    goal: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # The key that created the session (it owns it) and the other keys it let in:
    # key id -> "read" | "drive" (access.py).
    creator_key: str | None = None
    grants: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    version: int = 0

    def state(self) -> str:
        data = asdict(self)
        for column in ("id", "owner", "status", "version", "created_at", "updated_at"):
            data.pop(column)
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Session":
        state = json.loads(row["state"])
        return cls(id=row["id"], owner=row["owner"], status=row["status"],
                   version=row["version"], created_at=row["created_at"],
                   updated_at=row["updated_at"], **state)


class SessionStore:
    def __init__(self, target: Target, *, clock: Callable[[], float] = time.time) -> None:
        """`target`: a SQLite file path, a postgresql:// URL, or a shared `Database`."""
        self.clock = clock
        self._lock = threading.Lock()
        self._db, self._owns_db = open_database(target, name=COMPONENT)
        self.path = self._db.path  # the SQLite file (None on PostgreSQL)
        migrate(self._db, COMPONENT, MIGRATIONS, legacy=_legacy_version)

    def close(self) -> None:
        if self._owns_db:
            self._db.close()

    def create(self, session: Session) -> Session:
        now = self.clock()
        session.created_at = session.updated_at = now
        session.version = 1
        with self._lock:
            self._db.write(
                "INSERT INTO agent_sessions (id, owner, status, version, created_at, "
                "updated_at, state) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (session.id, session.owner, session.status, session.version, now, now,
                 session.state()))
        return session

    def load(self, session_id: str) -> Session | None:
        with self._lock:
            row = self._db.fetchone("SELECT * FROM agent_sessions WHERE id = ?",
                                    (session_id,))
        return Session.from_row(row) if row else None

    def save(self, session: Session) -> Session:
        """Write the session if nobody saved since it was loaded; bumps its version."""
        now = self.clock()
        with self._lock:
            changed = self._db.write(
                "UPDATE agent_sessions SET status = ?, version = version + 1, updated_at = ?, "
                "state = ? WHERE id = ? AND version = ?",
                (session.status, now, session.state(), session.id, session.version))
        if changed != 1:
            raise SessionConflict(f"session {session.id} was changed by another replica")
        session.version += 1
        session.updated_at = now
        return session

    # ------------------------------------------------------------------ leases
    def acquire(self, session_id: str, holder: str, ttl_s: float) -> bool:
        """Take the session's lease if it is free, expired, or already ours."""
        now = self.clock()
        with self._lock:
            taken = self._db.write(
                "UPDATE agent_sessions SET lease_owner = ?, lease_until = ? WHERE id = ? AND "
                "(lease_owner IS NULL OR lease_until < ? OR lease_owner = ?)",
                (holder, now + ttl_s, session_id, now, holder))
        return taken == 1

    def release(self, session_id: str, holder: str) -> None:
        with self._lock:
            # Idempotent: releasing twice changes nothing more.
            self._db.write(
                "UPDATE agent_sessions SET lease_owner = NULL, lease_until = NULL "
                "WHERE id = ? AND lease_owner = ?", (session_id, holder), idempotent=True)

    def lease(self, session_id: str) -> tuple[str | None, float | None]:
        with self._lock:
            row = self._db.fetchone("SELECT lease_owner, lease_until FROM agent_sessions "
                                    "WHERE id = ?", (session_id,))
        return (row["lease_owner"], row["lease_until"]) if row else (None, None)

    def recent(self, *, owner: str | None = None, status: str | None = None,
               limit: int = 100) -> list[Session]:
        """Sessions, most recently changed first; of one tenant (`owner`) and/or status."""
        clauses, params = [], []
        for clause, value in (("owner = ?", owner), ("status = ?", status)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._lock:
            rows = self._db.fetchall(f"SELECT * FROM agent_sessions {where} "
                                     "ORDER BY updated_at DESC LIMIT ?", (*params, int(limit)))
        return [Session.from_row(row) for row in rows]

    def list_ids(self, owner: str | None = None) -> list[str]:
        with self._lock:
            if owner is None:
                rows = self._db.fetchall("SELECT id FROM agent_sessions ORDER BY created_at")
            else:
                rows = self._db.fetchall("SELECT id FROM agent_sessions WHERE owner = ? "
                                         "ORDER BY created_at", (owner,))
            return [row["id"] for row in rows]
