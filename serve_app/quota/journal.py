"""The reservation journal: what a Quota shard has admitted and not yet settled.

Limit state lives in the shard's memory; the ledger holds what settled. Without a record of
the requests in between, a shard restarted mid-load would forget them until they settle
and could admit past a limit. So every admission is written here before its answer
leaves the shard, and a restarted shard restores the journal's live entries (not expired,
no ledger row yet) as reservations: windows, TPM and budget holds stay exact.

The journal must survive the shard's process, not the machine: SQLite writes its own file
(reservations.db) with synchronous=NORMAL (a commit reaches the OS, no fsync: a killed
process loses nothing), so an admission never waits on the ledger's fsync; PostgreSQL
commits with synchronous_commit off. Releases (after settlement, expiry) are batched and
may lag or be lost: an entry whose request has a ledger row is ignored at restart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serve_app.database import Database, Dialects, Target, migrate

COMPONENT = "reservations"
MIGRATIONS = [
    [
        """CREATE TABLE reservations (
            request_id TEXT PRIMARY KEY,
            key_id TEXT NOT NULL,
            at DOUBLE PRECISION NOT NULL,
            tokens BIGINT NOT NULL,
            cost_usd DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX reservations_expiry ON reservations(expires_at)",
    ],
]

_UPSERT = ("INSERT INTO reservations (request_id, key_id, at, tokens, cost_usd, expires_at) "
           "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO UPDATE SET "
           "tokens = excluded.tokens, cost_usd = excluded.cost_usd")
_NO_FSYNC = Dialects(sqlite="SELECT 1", postgresql="SET LOCAL synchronous_commit TO OFF")


@dataclass(frozen=True)
class JournalEntry:
    request_id: str
    key_id: str
    at: float
    tokens: int
    cost_usd: float
    expires_at: float

    def values(self) -> tuple[Any, ...]:
        return (self.request_id, self.key_id, self.at, self.tokens, self.cost_usd,
                self.expires_at)


class ReservationJournal:
    def __init__(self, target: Target, *, connect_timeout_s: float = 2.0) -> None:
        """`target`: its own SQLite file (reservations.db), or the shared PostgreSQL URL.
        A short connect timeout: admissions wait on the journal, and while its database
        is away they go on unrecorded rather than wait (see QuotaService)."""
        if isinstance(target, Database):
            self.db, self._owns_db = target, False
        else:
            self.db = Database(target, name=COMPONENT, synchronous="NORMAL",
                               connect_timeout_s=connect_timeout_s)
            self._owns_db = True
        migrate(self.db, COMPONENT, MIGRATIONS)
        self.writes = 0

    def record(self, entries: list[JournalEntry], released: list[str] = ()) -> None:
        """Admitted (or extended) reservations, and the ids of settled ones to drop, in
        one transaction."""
        if not entries and not released:
            return
        values = [entry.values() for entry in entries]
        gone = list(released)

        def write(tx: Any) -> None:
            tx.execute(_NO_FSYNC)
            if values:
                tx.executemany(_UPSERT, values)
            for start in range(0, len(gone), 500):
                chunk = gone[start:start + 500]
                tx.execute("DELETE FROM reservations WHERE request_id IN "
                           f"({', '.join('?' for _ in chunk)})", tuple(chunk))
        self.db.run(write, idempotent=True)
        self.writes += 1

    def release(self, request_ids: list[str]) -> None:
        self.record([], request_ids)

    def live(self, now: float) -> list[JournalEntry]:
        """Entries not yet expired, oldest first (the caller drops settled ones)."""
        self.db.write("DELETE FROM reservations WHERE expires_at <= ?", (now,), idempotent=True)
        rows = self.db.fetchall("SELECT request_id, key_id, at, tokens, cost_usd, expires_at "
                                "FROM reservations ORDER BY at")
        return [JournalEntry(r["request_id"], r["key_id"], float(r["at"]), int(r["tokens"]),
                             float(r["cost_usd"]), float(r["expires_at"])) for r in rows]

    def close(self) -> None:
        if self._owns_db:
            self.db.close()
