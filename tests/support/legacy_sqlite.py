"""The SQLite schemas and helper exactly as the stores wrote them before the database layer
(commit 72ba75f: serve_app/sqlite_db.py, the stores' MIGRATIONS and _SCHEMA), copied
verbatim so the upgrade tests build real old files. Never edit: it is history."""
# ruff: noqa
from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

ACCOUNTS_MIGRATIONS = [
    """
    CREATE TABLE tenants (
        tenant_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE api_keys (
        key_id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id),
        name TEXT NOT NULL DEFAULT '',
        key_hash TEXT NOT NULL,
        previous_hash TEXT,
        previous_valid_until REAL,
        allowed_models TEXT,
        rpm INTEGER,
        tpm INTEGER,
        budget_usd REAL,
        budget_period TEXT NOT NULL DEFAULT 'month',
        expires_at REAL,
        disabled INTEGER NOT NULL DEFAULT 0,
        can_confirm INTEGER NOT NULL DEFAULT 0,
        alert_webhook_url TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX api_keys_tenant ON api_keys(tenant_id)
    """,
    """
    ALTER TABLE api_keys ADD COLUMN route_overrides TEXT
    """,
    """
    ALTER TABLE api_keys ADD COLUMN cache_sampled INTEGER NOT NULL DEFAULT 0
    """,
    """
    ALTER TABLE api_keys ADD COLUMN can_self_confirm INTEGER NOT NULL DEFAULT 0
    """,
]

LEDGER_MIGRATIONS = [
    """
    CREATE TABLE usage (
        request_id TEXT PRIMARY KEY,
        ts REAL NOT NULL,
        tenant_id TEXT NOT NULL,
        key_id TEXT NOT NULL,
        route TEXT NOT NULL,
        model TEXT,
        tier TEXT,
        tokens_in INTEGER NOT NULL DEFAULT 0,
        tokens_out INTEGER NOT NULL DEFAULT 0,
        cost_usd REAL NOT NULL DEFAULT 0,
        cache_hit INTEGER NOT NULL DEFAULT 0,
        saved_usd REAL NOT NULL DEFAULT 0,
        latency_ms REAL NOT NULL DEFAULT 0,
        status INTEGER NOT NULL,
        error_code TEXT,
        fallback TEXT,
        sources TEXT
    );
    CREATE INDEX usage_key_ts ON usage(key_id, ts);
    CREATE INDEX usage_tenant_ts ON usage(tenant_id, ts);
    CREATE INDEX usage_ts ON usage(ts);
    CREATE TABLE budget_alerts (
        key_id TEXT NOT NULL,
        period_start REAL NOT NULL,
        threshold REAL NOT NULL,
        fired_at REAL NOT NULL,
        PRIMARY KEY (key_id, period_start, threshold)
    )
    """,
    # The caller's x-request-id: a correlation field only (never a key), looked up per
    # tenant. request_id is always the server's own id.
    """
    ALTER TABLE usage ADD COLUMN client_request_id TEXT;
    CREATE INDEX usage_tenant_client ON usage(tenant_id, client_request_id)
    """,
]

SESSIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS agent_sessions (
    id TEXT PRIMARY KEY,
    owner TEXT,
    status TEXT NOT NULL,
    version INTEGER NOT NULL,
    lease_owner TEXT,
    lease_until REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    state TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS agent_sessions_owner ON agent_sessions (owner, created_at);
"""

AUDIT_SCHEMA = """
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

# serve_app/sqlite_db.py
def connect(path: Path, *, synchronous: str = "FULL") -> sqlite3.Connection:
    """A connection in WAL mode; `synchronous=FULL` makes a commit survive power loss,
    NORMAL survives a process crash (both survive a killed replica)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(str(path), timeout=30, isolation_level=None,
                                 check_same_thread=False)
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute(f"PRAGMA synchronous={synchronous}")
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute("PRAGMA busy_timeout=30000")
    return connection


def migrate(connection: sqlite3.Connection, migrations: Sequence[str]) -> int:
    """Apply migrations[i] for every version above the stored one, each in a transaction.
    Migrations are append-only: never edit a released one, add the next."""
    connection.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = connection.execute("SELECT MAX(version) AS v FROM schema_version").fetchone()
    current = row["v"] or 0
    for version, script in enumerate(migrations, start=1):
        if version <= current:
            continue
        connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(script):
                connection.execute(statement)
            connection.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            connection.execute("COMMIT")
        except Exception:
            connection.execute("ROLLBACK")
            raise
    return len(migrations)


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
