"""Tenants and API keys in SQLite or PostgreSQL (versioned migrations), with an in-memory
index.

Several Quota shards share the tables (SQLite files on one node, PostgreSQL on a cluster).
Each key has one owner shard, and every read and write of a key goes through its owner
(serve_app.quota.sharding), so the owner's copy in the index is never stale: `get()`
falls back to the database on a miss (first sight), `refresh()` re-reads one key, and
`list()` and `tenants()` read the database (other shards create keys too) without caching
what they read. Only key hashes are stored.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from serve_app.accounts.keys import (
    NewKey,
    generate_key,
    hashes_match,
    is_valid_key_id,
    parse_key_id,
)
from serve_app.database import Target, legacy_schema_version, migrate, open_database

COMPONENT = "accounts"
# Versions 1-4 are the migrations of the SQLite-only store (its `schema_version` table),
# written portably: DOUBLE PRECISION for times and money, BIGINT for limits up to 2**63-1.
MIGRATIONS = [
    [
        """CREATE TABLE tenants (
            tenant_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE api_keys (
            key_id TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id),
            name TEXT NOT NULL DEFAULT '',
            key_hash TEXT NOT NULL,
            previous_hash TEXT,
            previous_valid_until DOUBLE PRECISION,
            allowed_models TEXT,
            rpm BIGINT,
            tpm BIGINT,
            budget_usd DOUBLE PRECISION,
            budget_period TEXT NOT NULL DEFAULT 'month',
            expires_at DOUBLE PRECISION,
            disabled INTEGER NOT NULL DEFAULT 0,
            can_confirm INTEGER NOT NULL DEFAULT 0,
            alert_webhook_url TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX api_keys_tenant ON api_keys(tenant_id)",
    ],
    ["ALTER TABLE api_keys ADD COLUMN route_overrides TEXT"],
    ["ALTER TABLE api_keys ADD COLUMN cache_sampled INTEGER NOT NULL DEFAULT 0"],
    ["ALTER TABLE api_keys ADD COLUMN can_self_confirm INTEGER NOT NULL DEFAULT 0"],
]

BudgetPeriod = Literal["day", "month"]
EDITABLE_FIELDS = {"name", "allowed_models", "rpm", "tpm", "budget_usd", "budget_period",
                   "expires_at", "disabled", "can_confirm", "alert_webhook_url",
                   "route_overrides", "cache_sampled", "can_self_confirm"}


@dataclass
class ApiKeyRecord:
    key_id: str
    tenant_id: str
    name: str = ""
    allowed_models: list[str] | None = None  # None: every model
    rpm: int | None = None  # None: unlimited
    tpm: int | None = None
    budget_usd: float | None = None
    budget_period: BudgetPeriod = "month"
    expires_at: float | None = None
    disabled: bool = False
    can_confirm: bool = False
    can_self_confirm: bool = False  # may approve tool calls its own agent runs asked for
    alert_webhook_url: str | None = None
    route_overrides: dict[str, Any] = field(default_factory=dict)
    cache_sampled: bool = False  # answers sampled with temperature > 0 may be cached
    created_at: float = 0.0
    updated_at: float = 0.0
    key_hash: str = field(default="", repr=False)
    previous_hash: str | None = field(default=None, repr=False)
    previous_valid_until: float | None = None

    def public(self) -> dict[str, Any]:
        """What the admin API shows: never the hashes."""
        data = asdict(self)
        data.pop("key_hash")
        data.pop("previous_hash")
        return data

    def allows_model(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


class AuthFailure(Exception):
    def __init__(self, reason: Literal["missing", "unknown", "disabled", "expired"]) -> None:
        super().__init__(reason)
        self.reason = reason


class AccountStore:
    def __init__(self, target: Target, pepper: bytes) -> None:
        """`target`: a SQLite file path, a postgresql:// URL, or a shared `Database`."""
        self.db, self._owns_db = open_database(target, name=COMPONENT)
        migrate(self.db, COMPONENT, MIGRATIONS, legacy=legacy_schema_version)
        self.pepper = pepper
        self.keys: dict[str, ApiKeyRecord] = {}
        for row in self.db.fetchall("SELECT * FROM api_keys"):
            record = _record_from_row(row)
            self.keys[record.key_id] = record

    # ------------------------------------------------------------------ tenants
    def ensure_tenant(self, tenant_id: str, name: str | None = None) -> None:
        """Create the tenant unless it exists (race-free between processes)."""
        self.db.write(_ENSURE_TENANT, (tenant_id, name or tenant_id, time.time()),
                      idempotent=True)

    def tenants(self) -> list[dict[str, Any]]:
        return self.db.fetchall("SELECT tenant_id, name, created_at FROM tenants "
                                "ORDER BY tenant_id")

    # ------------------------------------------------------------------ keys
    def create_key(self, tenant_id: str, key_id: str | None = None,
                   **fields: Any) -> tuple[ApiKeyRecord, NewKey]:
        """A new key; `key_id` (optional) must look like a generated one and be unused."""
        unknown = set(fields) - EDITABLE_FIELDS
        if unknown:
            raise ValueError(f"unknown key fields: {sorted(unknown)}")
        if key_id is not None and not is_valid_key_id(key_id):
            raise ValueError("key_id must be 12 characters from the key id alphabet "
                             "(letters and digits without 0, 1, I, O, l)")
        new = generate_key(self.pepper, key_id=key_id)
        now = time.time()
        record = ApiKeyRecord(key_id=new.key_id, tenant_id=tenant_id, key_hash=new.key_hash,
                              created_at=now, updated_at=now, **fields)
        _validate(record)

        def insert(tx: Any) -> None:
            tx.execute(_ENSURE_TENANT, (tenant_id, tenant_id, now))
            inserted = tx.execute(
                "INSERT INTO api_keys (key_id, tenant_id, name, key_hash, allowed_models, rpm,"
                " tpm, budget_usd, budget_period, expires_at, disabled, can_confirm,"
                " alert_webhook_url, route_overrides, cache_sampled, can_self_confirm,"
                " created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (key_id) DO NOTHING",
                (record.key_id, tenant_id, record.name, record.key_hash,
                 _json_or_none(record.allowed_models), record.rpm, record.tpm,
                 record.budget_usd, record.budget_period, record.expires_at,
                 int(record.disabled), int(record.can_confirm), record.alert_webhook_url,
                 json.dumps(record.route_overrides), int(record.cache_sampled),
                 int(record.can_self_confirm), now, now)).rowcount
            if inserted != 1:  # raised inside the transaction: the tenant rolls back too
                raise ValueError(f"key id {record.key_id} already exists")

        self.db.run(insert)
        self.keys[record.key_id] = record
        return record, new

    def get(self, key_id: str) -> ApiKeyRecord | None:
        """From the index; on a miss from the database (another process may have created
        the key), cached once found."""
        record = self.keys.get(key_id)
        return record if record is not None else self.refresh(key_id)

    def refresh(self, key_id: str) -> ApiKeyRecord | None:
        """Re-read one key from the database into the index (None, and dropped from the
        index, if it is not there)."""
        row = self.db.fetchone("SELECT * FROM api_keys WHERE key_id = ?", (key_id,))
        if row is None:
            self.keys.pop(key_id, None)
            return None
        record = _record_from_row(row)
        self.keys[key_id] = record
        return record

    def list(self, tenant_id: str | None = None) -> list[ApiKeyRecord]:
        """Every key (of a tenant), read from the database, oldest first."""
        if tenant_id is None:
            rows = self.db.fetchall("SELECT * FROM api_keys ORDER BY created_at, key_id")
        else:
            rows = self.db.fetchall("SELECT * FROM api_keys WHERE tenant_id = ? "
                                    "ORDER BY created_at, key_id", (tenant_id,))
        # Not cached: a listing shard is not the owner of most of these keys.
        return [_record_from_row(row) for row in rows]

    def update(self, key_id: str, **fields: Any) -> ApiKeyRecord:
        """Validate everything, write the database, and only then change memory: a failed
        update changes nothing anywhere."""
        current = self._require(key_id)
        unknown = set(fields) - EDITABLE_FIELDS
        if unknown:
            raise ValueError(f"unknown key fields: {sorted(unknown)}")
        candidate = replace(current, **fields, updated_at=time.time())
        _validate(candidate)
        self._save(candidate)
        self.keys[key_id] = candidate
        return candidate

    def rotate(self, key_id: str, grace_s: float = 0.0) -> NewKey:
        """A new secret for the same key (limits and spend carry over); the old secret keeps
        working for `grace_s` seconds so clients can switch without downtime."""
        current = self._require(key_id)
        new = generate_key(self.pepper, key_id=key_id)
        now = time.time()
        candidate = replace(
            current, key_hash=new.key_hash, updated_at=now,
            previous_hash=current.key_hash if grace_s > 0 else None,
            previous_valid_until=now + grace_s if grace_s > 0 else None)
        self._save(candidate)
        self.keys[key_id] = candidate
        return new

    def authenticate(self, full_key: str | None, now: float | None = None) -> ApiKeyRecord:
        if not full_key:
            raise AuthFailure("missing")
        now = time.time() if now is None else now
        key_id = parse_key_id(full_key)
        record = self.get(key_id) if key_id else None
        if record is None:
            # Same work as a known key, so timing does not tell ids apart.
            hashes_match(full_key, "0" * 64, self.pepper)
            raise AuthFailure("unknown")
        current = hashes_match(full_key, record.key_hash, self.pepper)
        previous = (record.previous_hash is not None and record.previous_valid_until is not None
                    and now < record.previous_valid_until
                    and hashes_match(full_key, record.previous_hash, self.pepper))
        if not (current or previous):
            raise AuthFailure("unknown")
        if record.disabled:
            raise AuthFailure("disabled")
        if record.expires_at is not None and now >= record.expires_at:
            raise AuthFailure("expired")
        return record

    # ------------------------------------------------------------------ internals
    def _require(self, key_id: str) -> ApiKeyRecord:
        """The key as stored now (another process may have changed it): writes start
        from it."""
        record = self.refresh(key_id)
        if record is None:
            raise KeyError(key_id)
        return record

    def _save(self, record: ApiKeyRecord) -> None:
        self.db.write(
            "UPDATE api_keys SET name=?, key_hash=?, previous_hash=?, previous_valid_until=?,"
            " allowed_models=?, rpm=?, tpm=?, budget_usd=?, budget_period=?, expires_at=?,"
            " disabled=?, can_confirm=?, alert_webhook_url=?, route_overrides=?, cache_sampled=?,"
            " can_self_confirm=?, updated_at=? WHERE key_id=?",
            (record.name, record.key_hash, record.previous_hash, record.previous_valid_until,
             _json_or_none(record.allowed_models), record.rpm, record.tpm, record.budget_usd,
             record.budget_period, record.expires_at, int(record.disabled),
             int(record.can_confirm), record.alert_webhook_url,
             json.dumps(record.route_overrides), int(record.cache_sampled),
             int(record.can_self_confirm), record.updated_at, record.key_id))

    def close(self) -> None:
        if self._owns_db:
            self.db.close()


_ENSURE_TENANT = ("INSERT INTO tenants (tenant_id, name, created_at) VALUES (?, ?, ?) "
                  "ON CONFLICT (tenant_id) DO NOTHING")
_INT64_MAX = 2**63 - 1


def _validate(record: ApiKeyRecord) -> None:
    """The store's own guard (the admin API validates first): every value must be of its
    type and storable, so a write can never half-apply."""
    def check(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(what)

    check(isinstance(record.name, str), "name must be a string")
    for name in ("rpm", "tpm"):
        value = getattr(record, name)
        check(value is None or (type(value) is int and 1 <= value <= _INT64_MAX),
              f"{name} must be a positive integer or null")
    for name in ("budget_usd", "expires_at"):
        value = getattr(record, name)
        check(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                and math.isfinite(value) and value >= 0),
              f"{name} must be a finite non-negative number or null")
    check(record.budget_period in ("day", "month"), "budget_period must be 'day' or 'month'")
    for name in ("disabled", "can_confirm", "cache_sampled", "can_self_confirm"):
        check(isinstance(getattr(record, name), bool), f"{name} must be true or false")
    check(record.allowed_models is None or (isinstance(record.allowed_models, list) and all(
        isinstance(m, str) for m in record.allowed_models)),
        "allowed_models must be a list of strings or null")
    check(isinstance(record.route_overrides, dict), "route_overrides must be an object")
    check(record.alert_webhook_url is None or isinstance(record.alert_webhook_url, str),
          "alert_webhook_url must be a string or null")


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _record_from_row(row: Any) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=row["key_id"], tenant_id=row["tenant_id"], name=row["name"],
        key_hash=row["key_hash"], previous_hash=row["previous_hash"],
        previous_valid_until=row["previous_valid_until"],
        allowed_models=json.loads(row["allowed_models"]) if row["allowed_models"] else None,
        rpm=row["rpm"], tpm=row["tpm"], budget_usd=row["budget_usd"],
        budget_period=row["budget_period"], expires_at=row["expires_at"],
        disabled=bool(row["disabled"]), can_confirm=bool(row["can_confirm"]),
        alert_webhook_url=row["alert_webhook_url"],
        route_overrides=json.loads(row["route_overrides"]) if row["route_overrides"] else {},
        cache_sampled=bool(row["cache_sampled"]),
        can_self_confirm=bool(row["can_self_confirm"]),
        created_at=row["created_at"], updated_at=row["updated_at"])
