"""Versioned, append-only migrations per component, tracked in one table.

`schema_migrations(component, version, applied_at)` records what ran, per component
(accounts, ledger, agent_sessions, agent_audit), so every store can share one PostgreSQL
database; on SQLite each store keeps its own file and the same table. migrations[i] is
version i + 1: a list of statements (one statement each, so PostgreSQL function bodies and
SQLite trigger bodies may hold `;`), each portable SQL or a `Dialects` pair. Never edit a
released migration; add the next one.

Several processes may start at once (Quota shards, AgentRunner replicas): each version runs
in its own transaction under a lock (PostgreSQL: a transaction-scoped advisory lock;
SQLite: BEGIN IMMEDIATE) and is re-checked inside it, so it runs exactly once.

`legacy(tx)` adopts a database written before this table existed: it returns the version
that database is already at (e.g. the old `schema_version` table of accounts.db/usage.db,
or 1 when a CREATE-IF-NOT-EXISTS table is there), and those versions are recorded without
running.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from serve_app.database.core import SQL, Database, Transaction

MIGRATIONS_TABLE = "schema_migrations"
_LOCK_KEY = 7_243_901_118  # pg_advisory_xact_lock key of schema changes (any number)

Migration = Sequence[SQL]


def migrate(db: Database, component: str, migrations: Sequence[Migration], *,
            legacy: Callable[[Transaction], int] | None = None) -> int:
    """Bring `component` up to len(migrations); returns that version."""
    with db.transaction() as tx:
        tx.advisory_lock(_LOCK_KEY)
        tx.execute(f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
                   "component TEXT NOT NULL, version INTEGER NOT NULL, "
                   "applied_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (component, version))")
        if not _applied(tx, component) and legacy is not None:
            baseline = min(legacy(tx), len(migrations))
            for version in range(1, baseline + 1):
                _record(tx, component, version)
    for version, statements in enumerate(migrations, start=1):
        with db.transaction() as tx:
            tx.advisory_lock(_LOCK_KEY)
            if version in _applied(tx, component):
                continue
            for statement in statements:
                tx.execute(statement)
            _record(tx, component, version)
    return len(migrations)


def applied_versions(db: Database, component: str) -> list[int]:
    return sorted(row["version"] for row in db.fetchall(
        f"SELECT version FROM {MIGRATIONS_TABLE} WHERE component = ?", (component,)))


def _applied(tx: Transaction, component: str) -> set[int]:
    return {row["version"] for row in tx.fetchall(
        f"SELECT version FROM {MIGRATIONS_TABLE} WHERE component = ?", (component,))}


def _record(tx: Transaction, component: str, version: int) -> None:
    tx.execute(f"INSERT INTO {MIGRATIONS_TABLE} (component, version, applied_at) "
               "VALUES (?, ?, ?)", (component, version, time.time()))


def legacy_schema_version(tx: Transaction) -> int:
    """The version recorded by the old SQLite helper (`schema_version` table), or 0."""
    if tx.dialect != "sqlite" or not tx.table_exists("schema_version"):
        return 0
    row = tx.fetchone("SELECT MAX(version) AS v FROM schema_version")
    return int(row["v"] or 0) if row else 0
