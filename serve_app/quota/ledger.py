"""The usage ledger: one row per request, committed durably before the response.

Concurrent appends are group-committed: rows that arrive while a commit is running wait
for the next one, so each commit (an fsync: SQLite with synchronous=FULL, PostgreSQL's
WAL flush) covers many requests. `append` returns only after the row's transaction has
committed. Inserts are idempotent by request id (ON CONFLICT DO NOTHING), so a retried
settlement never double-counts, and a batch whose PostgreSQL connection died mid-commit is
written again on a new connection.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from serve_app.database import Target, legacy_schema_version, migrate, open_database

COMPONENT = "ledger"
# Versions 1-2 are the migrations of the SQLite-only ledger (its `schema_version` table),
# written portably (DOUBLE PRECISION for times and money).
MIGRATIONS = [
    [
        """CREATE TABLE usage (
            request_id TEXT PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            tenant_id TEXT NOT NULL,
            key_id TEXT NOT NULL,
            route TEXT NOT NULL,
            model TEXT,
            tier TEXT,
            tokens_in INTEGER NOT NULL DEFAULT 0,
            tokens_out INTEGER NOT NULL DEFAULT 0,
            cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
            cache_hit INTEGER NOT NULL DEFAULT 0,
            saved_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
            latency_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
            status INTEGER NOT NULL,
            error_code TEXT,
            fallback TEXT,
            sources TEXT
        )""",
        "CREATE INDEX usage_key_ts ON usage(key_id, ts)",
        "CREATE INDEX usage_tenant_ts ON usage(tenant_id, ts)",
        "CREATE INDEX usage_ts ON usage(ts)",
        """CREATE TABLE budget_alerts (
            key_id TEXT NOT NULL,
            period_start DOUBLE PRECISION NOT NULL,
            threshold DOUBLE PRECISION NOT NULL,
            fired_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (key_id, period_start, threshold)
        )""",
    ],
    # The caller's x-request-id: a correlation field only (never a key), looked up per
    # tenant. request_id is always the server's own id.
    [
        "ALTER TABLE usage ADD COLUMN client_request_id TEXT",
        "CREATE INDEX usage_tenant_client ON usage(tenant_id, client_request_id)",
    ],
]

GROUP_COLUMNS = {"key": "key_id", "tenant": "tenant_id", "model": "model", "tier": "tier",
                 "route": "route"}
MIN_INTERVAL_S, MAX_INTERVAL_S = 60, 31 * 86_400  # time buckets of summary()


@dataclass
class UsageRow:
    request_id: str
    tenant_id: str
    key_id: str
    route: str
    status: int
    ts: float = field(default_factory=time.time)
    model: str | None = None
    tier: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    cache_hit: bool = False
    saved_usd: float = 0.0
    latency_ms: float = 0.0
    error_code: str | None = None
    fallback: str | None = None
    sources: list[str] | None = None
    client_request_id: str | None = None

    def values(self) -> tuple[Any, ...]:
        data = asdict(self)
        data["cache_hit"] = int(self.cache_hit)
        data["sources"] = json.dumps(self.sources) if self.sources else None
        return tuple(data[name] for name in _COLUMNS)


_COLUMNS = [f.name for f in UsageRow.__dataclass_fields__.values()]  # type: ignore[attr-defined]
_INSERT = (f"INSERT INTO usage ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in _COLUMNS)}) ON CONFLICT (request_id) DO NOTHING")


class UsageLedger:
    def __init__(self, target: Target) -> None:
        """`target`: a SQLite file path, a postgresql:// URL, or a shared `Database`."""
        self.db, self._owns_db = open_database(target, name=COMPONENT)
        migrate(self.db, COMPONENT, MIGRATIONS, legacy=legacy_schema_version)
        self._lock = threading.Lock()  # one writer at a time on this connection
        self._pending: list[tuple[UsageRow, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.commits = 0

    # ------------------------------------------------------------------ writes
    async def append(self, row: UsageRow) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((row, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())
        await future

    async def _flush_loop(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self._commit, [row for row, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    def _commit(self, rows: list[UsageRow]) -> None:
        values = [row.values() for row in rows]
        with self._lock:
            # One transaction per batch. Idempotent (ON CONFLICT DO NOTHING by request id):
            # if the PostgreSQL connection dies mid-commit, the batch is written once more
            # on a new connection, and rows that did commit are not counted twice.
            self.db.run(lambda tx: tx.executemany(_INSERT, values), idempotent=True)
            self.commits += 1

    def append_sync(self, row: UsageRow) -> None:
        self._commit([row])

    # ------------------------------------------------------------------ reads
    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return self.db.fetchall(sql, params)

    def spent_since(self, key_id: str, since: float) -> float:
        rows = self._read("SELECT COALESCE(SUM(cost_usd), 0) AS spent FROM usage "
                          "WHERE key_id = ? AND ts >= ?", (key_id, since))
        return float(rows[0]["spent"])

    def recent_usage(self, key_id: str, since: float) -> list[tuple[float, int]]:
        """(ts, tokens_in + tokens_out) of the key's rows with ts >= since, oldest first:
        what a restarted replica rebuilds its rate-limit windows from."""
        rows = self._read("SELECT ts, tokens_in + tokens_out AS tokens FROM usage "
                          "WHERE key_id = ? AND ts >= ? ORDER BY ts", (key_id, since))
        return [(float(r["ts"]), int(r["tokens"])) for r in rows]

    def settled(self, request_ids: list[str]) -> set[str]:
        """Which of these requests have a ledger row."""
        found: set[str] = set()
        for start in range(0, len(request_ids), 500):
            chunk = request_ids[start:start + 500]
            marks = ", ".join("?" for _ in chunk)
            found.update(r["request_id"] for r in self._read(
                f"SELECT request_id FROM usage WHERE request_id IN ({marks})", tuple(chunk)))
        return found

    def row(self, request_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM usage WHERE request_id = ?", (request_id,))
        if not rows:
            return None
        return _decoded(rows[0])

    def rows(self, *, start: float | None = None, end: float | None = None,
             tenant_id: str | None = None, key_id: str | None = None,
             client_request_id: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        if client_request_id is not None and tenant_id is None:
            raise ValueError("client_request_id is looked up per tenant: add tenant_id")
        where, params = _filters(start, end, tenant_id, key_id, client_request_id)
        return [_decoded(r) for r in self._read(
            f"SELECT * FROM usage {where} ORDER BY ts DESC LIMIT ?", (*params, limit))]

    def summary(self, *, group_by: str = "key", start: float | None = None,
                end: float | None = None, tenant_id: str | None = None,
                key_id: str | None = None,
                interval_s: int | None = None) -> list[dict[str, Any]]:
        """Requests, tokens, cost, cache hits, savings, errors and fallbacks per `group_by`
        value; with `interval_s`, per time bucket too (`bucket`: its start, epoch seconds),
        oldest bucket first."""
        column = GROUP_COLUMNS.get(group_by)
        if column is None:
            raise ValueError(f"group_by must be one of {sorted(GROUP_COLUMNS)}")
        where, params = _filters(start, end, tenant_id, key_id)
        select, group, order = f"{column} AS {group_by}", column, "cost_usd DESC"
        if interval_s is not None:
            if not MIN_INTERVAL_S <= int(interval_s) <= MAX_INTERVAL_S:
                raise ValueError(f"interval_s must be in [{MIN_INTERVAL_S}, {MAX_INTERVAL_S}]")
            bucket = self.db.bucket_start("ts", int(interval_s))
            select, group = f"{bucket} AS bucket, {select}", f"{bucket}, {column}"
            order = f"bucket, {column}"
        return self._read(
            f"SELECT {select}, COUNT(*) AS requests,"
            " SUM(CASE WHEN status < 400 THEN 1 ELSE 0 END) AS succeeded,"
            " SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END) AS errors,"
            " SUM(CASE WHEN fallback IS NOT NULL THEN 1 ELSE 0 END) AS fallbacks,"
            " SUM(tokens_in) AS tokens_in, SUM(tokens_out) AS tokens_out,"
            f" {self.db.round_sum('cost_usd', 10)} AS cost_usd,"
            " SUM(cache_hit) AS cache_hits,"
            f" {self.db.round_sum('saved_usd', 10)} AS saved_usd"
            f" FROM usage {where} GROUP BY {group} ORDER BY {order}", params)

    # ------------------------------------------------------------------ alerts
    def mark_alert(self, key_id: str, period_start: float, threshold: float) -> bool:
        """True if this (key, period, threshold) had not fired before (now it has)."""
        with self._lock:
            inserted = self.db.write(
                "INSERT INTO budget_alerts (key_id, period_start, threshold, fired_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (key_id, period_start, threshold) DO NOTHING",
                (key_id, period_start, threshold, time.time()))
            return inserted == 1

    def close(self) -> None:
        with self._lock:
            if self._owns_db:
                self.db.close()


def _filters(start: float | None, end: float | None, tenant_id: str | None,
             key_id: str | None, client_request_id: str | None = None
             ) -> tuple[str, tuple[Any, ...]]:
    clauses, params = [], []
    for clause, value in (("ts >= ?", start), ("ts < ?", end), ("tenant_id = ?", tenant_id),
                          ("key_id = ?", key_id), ("client_request_id = ?", client_request_id)):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", tuple(params)


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    row["cache_hit"] = bool(row["cache_hit"])
    row["sources"] = json.loads(row["sources"]) if row.get("sources") else None
    return row
