import asyncio
import threading
import time

import pytest

from serve_app.quota.ledger import UsageLedger, UsageRow
from tests.support.db_helpers import run_writers


def make_row(i, key="k", cost=0.01, tenant="t", model="m", ts=None):
    row = UsageRow(request_id=f"r{i}", tenant_id=tenant, key_id=key, route="/v1/chat/completions",
                   status=200, model=model, tokens_in=3, tokens_out=4, cost_usd=cost,
                   sources=["doc:a@1"] if i == 0 else None)
    if ts is not None:
        row.ts = ts
    return row


def test_concurrent_appends_are_group_committed_and_all_durable(db_target):
    ledger = UsageLedger(db_target("u.db"))

    async def run():
        await asyncio.gather(*(ledger.append(make_row(i)) for i in range(200)))

    asyncio.run(run())
    assert ledger.commits < 200  # batched
    ledger.close()
    reopened = UsageLedger(db_target("u.db"))
    assert len(reopened.rows(limit=1000)) == 200
    assert reopened.row("r0")["sources"] == ["doc:a@1"]


def test_summary_groups_and_filters(db_target):
    ledger = UsageLedger(db_target("u.db"))
    for i in range(4):
        ledger.append_sync(make_row(i, key="a" if i < 3 else "b", model="m1" if i % 2 else "m2"))
    by_key = {r["key"]: r for r in ledger.summary(group_by="key")}
    assert by_key["a"]["requests"] == 3 and by_key["a"]["tokens_out"] == 12
    assert by_key["a"]["cost_usd"] == 0.03 and isinstance(by_key["a"]["cost_usd"], float)
    assert by_key["a"]["cache_hits"] == 0 and by_key["a"]["succeeded"] == 3
    assert ledger.summary(group_by="model", key_id="b")[0]["model"] == "m1"
    assert ledger.spent_since("a", 0) == 0.03
    assert ledger.spent_since("nobody", 0) == 0.0


def test_summary_by_time_bucket_floors_timestamps_and_counts_errors_and_fallbacks(db_target):
    ledger = UsageLedger(db_target("u.db"))
    hour = 3600
    base = 1_700_000_000 // hour * hour
    # 3599.9 s into a bucket must stay in it: a rounding cast would move it to the next.
    for i, (offset, tenant) in enumerate([(1, "a"), (3599.9, "a"), (3599.9, "b"),
                                          (hour + 5, "a")]):
        row = make_row(i, tenant=tenant, ts=base + offset)
        if i == 1:
            row.status, row.error_code = 429, "rate_limited"
        if i == 2:
            row.fallback = "openai-mini"
        ledger.append_sync(row)
    rows = ledger.summary(group_by="tenant", interval_s=hour)
    assert [(r["bucket"], r["tenant"], r["requests"]) for r in rows] == [
        (base, "a", 2), (base, "b", 1), (base + hour, "a", 1)]
    assert (rows[0]["errors"], rows[0]["succeeded"], rows[1]["fallbacks"]) == (1, 1, 1)
    assert all(isinstance(r["bucket"], int) for r in rows)
    only_b = ledger.summary(group_by="tenant", interval_s=hour, tenant_id="b")
    assert [r["tenant"] for r in only_b] == ["b"]
    for bad in (0, 59, 31 * 86_400 + 1):
        with pytest.raises(ValueError):
            ledger.summary(interval_s=bad)


def test_duplicate_request_id_is_ignored(db_target):
    ledger = UsageLedger(db_target("u.db"))
    ledger.append_sync(make_row(1))
    ledger.append_sync(make_row(1, cost=5.0))
    assert ledger.spent_since("k", 0) == 0.01


def test_budget_alerts_fire_once(db_target):
    first, second = UsageLedger(db_target("u.db")), UsageLedger(db_target("u.db"))
    assert first.mark_alert("k", 100.0, 0.5)
    assert not second.mark_alert("k", 100.0, 0.5)
    assert second.mark_alert("k", 100.0, 0.8)


def test_recent_usage_rebuilds_rate_windows(db_target):
    ledger = UsageLedger(db_target("u.db"))
    now = time.time()
    for i, age in enumerate((120, 50, 10, 30)):
        ledger.append_sync(make_row(i, ts=now - age))
    ledger.append_sync(make_row(9, key="other", ts=now))
    recent = ledger.recent_usage("k", now - 60)
    assert recent == [(now - 50, 7), (now - 30, 7), (now - 10, 7)]
    assert all(isinstance(ts, float) and isinstance(n, int) for ts, n in recent)
    assert ledger.recent_usage("k", now + 1) == []


def test_two_processes_append_at_once(db_target, tmp_path):
    target = db_target("u.db")
    UsageLedger(target).close()  # migrated once up front; the writers race on rows only
    run_writers("ledger", target, tmp_path, ["p1", "p2"], 150)
    ledger = UsageLedger(target)
    rows = ledger.rows(limit=10_000)
    assert len(rows) == 300 and len({r["request_id"] for r in rows}) == 300
    assert {r["key"]: r["requests"] for r in ledger.summary()} == {"p1": 150, "p2": 150}


def test_two_processes_migrate_a_fresh_database_at_once(db_target, tmp_path):
    run_writers("ledger", db_target("u.db"), tmp_path, ["p1", "p2"], 10)
    assert len(UsageLedger(db_target("u.db")).rows(limit=100)) == 20


def test_appends_survive_a_postgresql_restart(postgres_server):
    """Every append that returned is in the ledger afterwards, and appends go on after the
    server came back (the ledger reconnects; the batch that died with the connection is
    retried, ON CONFLICT DO NOTHING keeps it from counting twice)."""
    url = postgres_server.create_database()
    ledger = UsageLedger(url)
    returned: list[str] = []
    failed: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        async def loop() -> None:
            i = 0
            while not stop.is_set():
                rows = [make_row(f"w{i + j}") for j in range(5)]
                i += 5
                results = await asyncio.gather(*(ledger.append(r) for r in rows),
                                               return_exceptions=True)
                for row, result in zip(rows, results):
                    (failed if isinstance(result, BaseException) else returned).append(
                        row.request_id)
                await asyncio.sleep(0.002)
        asyncio.run(loop())

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        _wait(lambda: len(returned) >= 50)
        postgres_server.restart()
        after_restart = len(returned)
        _wait(lambda: len(returned) >= after_restart + 50)
    finally:
        stop.set()
        thread.join(30)
    ledger.append_sync(make_row("after"))
    assert ledger.db.reconnects >= 1
    stored = {r["request_id"] for r in UsageLedger(url).rows(limit=100_000)}
    assert set(returned) <= stored
    assert "rafter" in stored
    assert len(failed) <= 10, failed  # at most the batch in flight when the server died


def _wait(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
