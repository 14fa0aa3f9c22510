import asyncio

from serve_app.quota.ledger import UsageLedger, UsageRow


def make_row(i, key="k", cost=0.01, tenant="t", model="m"):
    return UsageRow(request_id=f"r{i}", tenant_id=tenant, key_id=key, route="/v1/chat/completions",
                    status=200, model=model, tokens_in=3, tokens_out=4, cost_usd=cost,
                    sources=["doc:a@1"] if i == 0 else None)


def test_concurrent_appends_are_group_committed_and_all_durable(tmp_path):
    ledger = UsageLedger(tmp_path / "u.db")

    async def run():
        await asyncio.gather(*(ledger.append(make_row(i)) for i in range(200)))

    asyncio.run(run())
    assert ledger.commits < 200  # batched
    ledger.close()
    reopened = UsageLedger(tmp_path / "u.db")
    assert len(reopened.rows(limit=1000)) == 200
    assert reopened.row("r0")["sources"] == ["doc:a@1"]


def test_summary_groups_and_filters(tmp_path):
    ledger = UsageLedger(tmp_path / "u.db")
    for i in range(4):
        ledger.append_sync(make_row(i, key="a" if i < 3 else "b", model="m1" if i % 2 else "m2"))
    by_key = {r["key"]: r for r in ledger.summary(group_by="key")}
    assert by_key["a"]["requests"] == 3 and by_key["a"]["tokens_out"] == 12
    assert ledger.summary(group_by="model", key_id="b")[0]["model"] == "m1"
    assert ledger.spent_since("a", 0) == 0.03


def test_duplicate_request_id_is_ignored(tmp_path):
    ledger = UsageLedger(tmp_path / "u.db")
    ledger.append_sync(make_row(1))
    ledger.append_sync(make_row(1, cost=5.0))
    assert ledger.spent_since("k", 0) == 0.01
