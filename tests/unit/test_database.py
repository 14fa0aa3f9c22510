"""The database layer: old SQLite files upgrade in place, one PostgreSQL database holds
every store, lost connections are replaced (retrying only what is safe), and the URL's
password never shows in logs or errors."""
from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import traceback

import psycopg
import pytest

from serve_app.accounts.keys import generate_key
from serve_app.accounts.store import AccountStore
from serve_app.agent.audit import GENESIS, AuditLog, row_hash
from serve_app.agent.sessions import Session, SessionStore
from serve_app.database import Database, DatabaseError, applied_versions, redact
from serve_app.database.config import DatabaseSettings
from serve_app.database.core import _to_pyformat
from serve_app.quota.ledger import UsageLedger, UsageRow
from serve_app.settings import StackAppSettings
from tests.support import legacy_sqlite as legacy

PEPPER = b"pepper"


# ------------------------------------------------------------------ old SQLite files
def old_accounts_file(path, versions=4):
    db = legacy.connect(path)
    legacy.migrate(db, legacy.ACCOUNTS_MIGRATIONS[:versions])
    new = generate_key(PEPPER)
    db.execute("INSERT OR IGNORE INTO tenants (tenant_id, name, created_at) VALUES (?, ?, ?)",
               ("acme", "Acme", 1.5))
    db.execute("INSERT INTO api_keys (key_id, tenant_id, name, key_hash, allowed_models, rpm,"
               " budget_usd, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (new.key_id, "acme", "old", new.key_hash, json.dumps(["m1"]), 7, 2.5, 1.5, 1.5))
    db.close()
    return new


@pytest.mark.parametrize("versions", [4, 2])
def test_an_old_accounts_file_opens_and_upgrades_in_place(tmp_path, versions):
    path = tmp_path / "accounts.db"
    new = old_accounts_file(path, versions)
    store = AccountStore(path, PEPPER)
    record = store.authenticate(new.secret)
    assert (record.tenant_id, record.name, record.rpm, record.budget_usd,
            record.allowed_models) == ("acme", "old", 7, 2.5, ["m1"])
    assert record.route_overrides == {} and not record.cache_sampled
    assert applied_versions(store.db, "accounts") == [1, 2, 3, 4]
    store.update(record.key_id, can_self_confirm=True, cache_sampled=True)
    store.create_key("acme", rpm=1)
    store.close()
    again = AccountStore(path, PEPPER)  # nothing runs twice
    assert again.get(record.key_id).can_self_confirm and len(again.list("acme")) == 2
    old = sqlite3.connect(path)
    assert [r[0] for r in old.execute("SELECT version FROM schema_version")] == list(
        range(1, versions + 1))  # the old table is left as it was
    old.close()


def test_an_old_ledger_file_opens_and_upgrades_in_place(tmp_path):
    path = tmp_path / "usage.db"
    db = legacy.connect(path)
    legacy.migrate(db, legacy.LEDGER_MIGRATIONS[:1])  # before client_request_id
    db.execute("INSERT OR IGNORE INTO usage (request_id, ts, tenant_id, key_id, route, "
               "tokens_in, tokens_out, cost_usd, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
               ("old-1", 100.0, "t", "k", "/v1/x", 3, 4, 0.25, 200))
    db.execute("INSERT OR IGNORE INTO budget_alerts VALUES (?, ?, ?, ?)", ("k", 0.0, 0.5, 1.0))
    db.close()
    ledger = UsageLedger(path)
    assert applied_versions(ledger.db, "ledger") == [1, 2]
    assert ledger.spent_since("k", 0) == 0.25 and ledger.recent_usage("k", 0) == [(100.0, 7)]
    assert not ledger.mark_alert("k", 0.0, 0.5)
    ledger.append_sync(UsageRow(request_id="new-1", tenant_id="t", key_id="k", route="/v1/x",
                                status=200, cost_usd=0.5, client_request_id="c1"))
    assert [r["request_id"] for r in ledger.rows(tenant_id="t", client_request_id="c1")] == [
        "new-1"]
    assert ledger.summary()[0]["cost_usd"] == 0.75


def test_an_old_sessions_file_opens_and_keeps_its_sessions(tmp_path):
    path = tmp_path / "sessions.sqlite3"
    db = legacy.connect(path)
    db.executescript(legacy.SESSIONS_SCHEMA)
    session = Session(id="s1", owner="t", model="m", tools=["python"], limits={})
    db.execute("INSERT INTO agent_sessions (id, owner, status, version, created_at, "
               "updated_at, state) VALUES (?, ?, ?, ?, ?, ?, ?)",
               ("s1", "t", "completed", 3, 1.0, 2.0, session.state()))
    db.close()
    store = SessionStore(path)
    assert applied_versions(store._db, "agent_sessions") == [1]
    loaded = store.load("s1")
    assert loaded.version == 3 and loaded.tools == ["python"] and store.list_ids("t") == ["s1"]
    assert store.acquire("s1", "me", 10)
    store.save(loaded)
    assert store.load("s1").version == 4


def old_audit_row(seq, prev, with_requester):
    row = {"seq": seq, "session_id": "s", "call_id": f"c{seq}", "step": seq, "event": "started",
           "tool": "python", "arguments": json.dumps({"i": seq}), "decision": "auto",
           "confirmer": None, "result_summary": None, "duration_ms": None, "error": None,
           "created_at": 1000.0 + seq, "prev_hash": prev}
    if with_requester:
        row["requester"] = "key1"
    row["hash"] = row_hash(row)
    return row


@pytest.mark.parametrize("with_requester", [True, False])
def test_an_old_audit_file_opens_verifies_and_keeps_chaining(tmp_path, with_requester):
    path = tmp_path / "audit.sqlite3"
    db = legacy.connect(path)
    schema = legacy.AUDIT_SCHEMA
    if not with_requester:  # a log from before requesters were recorded
        schema = schema.replace("    hash TEXT NOT NULL,\n    requester TEXT\n",
                                "    hash TEXT NOT NULL\n")
    db.executescript(schema)
    prev = GENESIS
    for seq in (1, 2):
        row = old_audit_row(seq, prev, with_requester)
        db.execute(f"INSERT INTO audit_events ({', '.join(row)}) "
                   f"VALUES ({', '.join('?' for _ in row)})", list(row.values()))
        prev = row["hash"]
    db.close()
    log = AuditLog(path)
    assert applied_versions(log._db, "agent_audit") == [1, 2]
    assert log.verify_chain() is None
    assert log.append(session_id="s", call_id="c3", step=3, event="started", tool="python",
                      decision="auto", requester="key2") == 3
    assert log.verify_chain() is None and log.head() == log.events()[-1]["hash"]
    raw = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        raw.execute("DELETE FROM audit_events WHERE seq = 1")
    raw.close()


def test_a_new_sqlite_file_gets_the_same_schema_as_an_upgraded_one(tmp_path):
    def columns(path, table):
        db = sqlite3.connect(path)
        found = [(r[1], r[2], r[3], r[4], r[5]) for r in db.execute(f"PRAGMA table_info({table})")]
        db.close()
        return found

    old_accounts_file(tmp_path / "old.db")
    AccountStore(tmp_path / "old.db", PEPPER).close()
    AccountStore(tmp_path / "new.db", PEPPER).close()
    affinity = {"REAL": "REAL", "DOUBLE PRECISION": "REAL", "INTEGER": "INTEGER",
                "BIGINT": "INTEGER", "TEXT": "TEXT"}
    for table in ("tenants", "api_keys"):
        old = [(n, affinity[t], *rest) for n, t, *rest in columns(tmp_path / "old.db", table)]
        new = [(n, affinity[t], *rest) for n, t, *rest in columns(tmp_path / "new.db", table)]
        assert old == new


# ------------------------------------------------------------------ one shared database
def test_every_store_shares_one_postgresql_database(postgres_server):
    url = postgres_server.create_database()
    stores = [AccountStore(url, PEPPER), UsageLedger(url), SessionStore(url), AuditLog(url)]
    with psycopg.connect(url) as db:
        rows = db.execute("SELECT component, MAX(version) FROM schema_migrations "
                          "GROUP BY component ORDER BY component").fetchall()
        types = dict(db.execute(
            "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'public'").fetchall())
    assert rows == [("accounts", 4), ("agent_audit", 2), ("agent_sessions", 1), ("ledger", 2)]
    # Never PostgreSQL's 4-byte REAL for times or money; limits can exceed int32.
    assert "real" not in types.values()
    for column in ("usage.ts", "usage.cost_usd", "api_keys.budget_usd",
                   "audit_events.created_at", "agent_sessions.lease_until"):
        assert types[column] == "double precision", column
    assert types["api_keys.rpm"] == types["audit_events.seq"] == "bigint"
    for store in stores:
        store.close()
    AccountStore(url, PEPPER).close()  # reopening runs nothing again


def test_the_sql_is_written_once():
    assert _to_pyformat("SELECT ? , '?', \"a?\" WHERE x LIKE 'a%' AND y = ? % 2") == (
        "SELECT %s , '?', \"a?\" WHERE x LIKE 'a%%' AND y = %s %% 2")


# ------------------------------------------------------------------ lost connections
def terminate_backends(server, url):
    database = url.rsplit("/", 1)[1]
    with server.admin_connect() as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = %s AND pid <> pg_backend_pid()", (database,))


@pytest.fixture
def pg_db(postgres_server):
    url = postgres_server.create_database()
    db = Database(url, name="test")
    db.execute("CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER)")
    yield postgres_server, url, db
    db.close()


def test_an_idle_connection_that_died_is_replaced_before_any_write(pg_db):
    server, url, db = pg_db
    terminate_backends(server, url)
    assert db.write("INSERT INTO t (id, n) VALUES (?, ?)", ("a", 1)) == 1  # not idempotent
    assert db.reconnects == 1
    terminate_backends(server, url)
    assert db.fetchall("SELECT id FROM t") == [{"id": "a"}]  # reads retry once


def test_a_transaction_cut_off_midway_is_retried_only_when_idempotent(pg_db):
    server, url, db = pg_db
    calls = []

    def write(tx, row_id):
        calls.append(row_id)
        tx.execute("INSERT INTO t (id, n) VALUES (?, 1) ON CONFLICT (id) DO NOTHING", (row_id,))
        if len(calls) == 1:
            terminate_backends(server, url)  # the server goes away mid-transaction
        tx.execute("SELECT 1")

    with pytest.raises(psycopg.OperationalError):
        db.run(lambda tx: write(tx, "x"))
    assert calls == ["x"] and db.fetchall("SELECT id FROM t") == []
    calls.clear()
    db.run(lambda tx: write(tx, "y"), idempotent=True)
    assert calls == ["y", "y"] and db.fetchall("SELECT id FROM t") == [{"id": "y"}]


def test_errors_other_than_a_lost_connection_are_never_retried(pg_db):
    _, _, db = pg_db
    calls = []

    def bad(tx):
        calls.append(1)
        tx.execute("INSERT INTO t (id, n) VALUES (?, ?)", ("z", "not a number"))

    with pytest.raises(psycopg.Error):
        db.run(bad, idempotent=True)
    assert calls == [1]
    assert db.write("INSERT INTO t (id, n) VALUES (?, ?)", ("z", 2)) == 1  # rolled back


# ------------------------------------------------------------------ the URL is a secret
def test_redact_hides_passwords():
    assert redact("postgresql://app:s3cr%40t@db:5432/llm") == "postgresql://app:***@db:5432/llm"
    assert redact("postgresql://app@db/llm?password=x&sslmode=require") == (
        "postgresql://app@db/llm?password=***&sslmode=require")
    assert redact("postgres://db/llm") == "postgres://db/llm"


def test_the_password_never_shows_in_errors_or_logs(postgres_server, caplog):
    password = postgres_server.password
    url = postgres_server.create_database()
    wrong = url.replace(password, password[::-1] + "Zq9")
    with pytest.raises(DatabaseError) as caught:
        Database(wrong, name="accounts", connect_timeout_s=0.5)
    text = "".join(traceback.format_exception(caught.value)) + repr(caught.value)
    assert password[::-1] + "Zq9" not in text and "***" in text
    assert "password authentication failed" in text  # still says why
    bad_port = url.replace(f":{postgres_server.port}/", ":1/")
    with pytest.raises(DatabaseError) as caught:
        Database(bad_port, name="ledger", connect_timeout_s=0.3)
    assert password not in "".join(traceback.format_exception(caught.value))

    caplog.set_level(logging.DEBUG)
    ledger = UsageLedger(url)
    assert password not in repr(ledger.db) and "***" in ledger.db.location
    terminate_backends(postgres_server, url)
    ledger.append_sync(UsageRow(request_id="r", tenant_id="t", key_id="k", route="/", status=200))
    assert "reconnecting" in caplog.text and "***" in caplog.text
    assert password not in caplog.text
    assert hashlib.sha256(password.encode()).hexdigest() not in caplog.text


def test_a_malformed_url_is_refused_without_echoing_it(monkeypatch):
    settings = DatabaseSettings()
    monkeypatch.setenv("LLMSTACK_DATABASE_URL", "mysql://u:hunter2@h/db")
    with pytest.raises(ValueError) as caught:
        settings.url()
    assert "hunter2" not in str(caught.value) and "LLMSTACK_DATABASE_URL" in str(caught.value)
    with pytest.raises(ValueError) as caught:
        Database("mysql://u:hunter2@h/db")
    assert "hunter2" not in str(caught.value)


# ------------------------------------------------------------------ selection
def test_backend_selection_by_one_environment_variable(monkeypatch, tmp_path):
    stack = StackAppSettings.model_validate({"data_dir": str(tmp_path)})
    assert stack.database.url_env == "LLMSTACK_DATABASE_URL"
    monkeypatch.delenv("LLMSTACK_DATABASE_URL", raising=False)
    assert stack.database.url() is None
    assert stack.database.target(tmp_path / "accounts.db") == tmp_path / "accounts.db"
    monkeypatch.setenv("LLMSTACK_DATABASE_URL", "  ")
    assert stack.database.url() is None
    monkeypatch.setenv("MY_DB", "postgresql://app:pw@db/llm")
    custom = StackAppSettings.model_validate({"data_dir": str(tmp_path),
                                              "database": {"url_env": "MY_DB"}})
    assert custom.database.target(tmp_path / "usage.db") == "postgresql://app:pw@db/llm"
    required = StackAppSettings.model_validate({"database": {"url_env": "MY_DB",
                                                              "require_url": True}})
    assert required.database.url() == "postgresql://app:pw@db/llm"
    monkeypatch.delenv("MY_DB")
    with pytest.raises(ValueError, match="MY_DB is not set"):
        required.database.url()
    with pytest.raises(ValueError):
        StackAppSettings.model_validate({"database": {"url": "postgresql://x"}})
    with pytest.raises(ValueError):
        StackAppSettings.model_validate({"database": {"url_env": "not a name"}})
