"""QuotaService without Ray: admission order, atomic reservations, settlement, alerts."""
import asyncio

import pytest

from serve_app.accounts.store import AccountStore
from serve_app.errors import ApiError
from serve_app.quota.ledger import UsageLedger, UsageRow
from serve_app.quota.pricing import Price
from serve_app.quota.service import QuotaPolicy, QuotaService

PRICE = Price(input_per_mtok=1000, output_per_mtok=1000)  # $0.001 per token


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.sent = []

    def send(self, url, payload):
        self.sent.append((url, payload))


@pytest.fixture
def setup(tmp_path):
    clock = Clock()
    notifier = Recorder()
    alerts = []
    service = QuotaService(AccountStore(tmp_path / "a.db", b"p"), UsageLedger(tmp_path / "u.db"),
                           QuotaPolicy(alert_webhook_url="http://hook"), "admin-secret",
                           clock=clock, notifier=notifier, alert_log=alerts.append)
    return service, clock, notifier, alerts


def admit(service, key, *, model="m", known=True, prompt=10, out=10, rid="r"):
    """The gateway reserves the worst case: prompt + capped output, priced."""
    return service.admit(api_key=key, model=model, model_known=known, tokens=prompt + out,
                         cost_usd=PRICE.cost(prompt, out), request_id=rid)


def row(rid, key_id, cost, tokens=(5, 5), status=200):
    return UsageRow(request_id=rid, tenant_id="t", key_id=key_id, route="/v1/chat/completions",
                    status=status, model="m", tokens_in=tokens[0], tokens_out=tokens[1],
                    cost_usd=cost)


def test_admission_order_401_404_403(setup):
    service, *_ = setup
    key = service.create_key("t", allowed_models=["m"])["key"]
    with pytest.raises(ApiError) as caught:
        admit(service, None, known=False)
    assert caught.value.status == 401  # unauthenticated callers learn nothing about models
    with pytest.raises(ApiError) as caught:
        admit(service, key, model="x", known=False)
    assert caught.value.status == 404
    with pytest.raises(ApiError) as caught:
        admit(service, key, model="other", known=True)
    assert caught.value.status == 403 and caught.value.code == "model_not_allowed"


def test_rpm_exact_with_retry_after_and_refill(setup):
    service, clock, *_ = setup
    key = service.create_key("t", rpm=3)["key"]
    results = []
    for i in range(7):
        try:
            admit(service, key, rid=f"r{i}")
            results.append(200)
        except ApiError as error:
            results.append(error.status)
            assert error.code == "rate_limit_rpm" and int(error.headers["retry-after"]) >= 1
    assert results.count(200) == 3
    clock.now += 61
    admit(service, key, rid="later")


def test_tpm_counts_prompt_plus_max_tokens(setup):
    service, *_ = setup
    key = service.create_key("t", tpm=100)["key"]
    admit(service, key, prompt=40, out=40, rid="a")
    with pytest.raises(ApiError) as caught:
        admit(service, key, prompt=10, out=20, rid="b")
    assert caught.value.code == "rate_limit_tpm"
    with pytest.raises(ApiError) as caught:
        admit(service, key, prompt=10, out=500, rid="c")  # can never fit
    assert "lower max_tokens" in caught.value.message


def test_budget_reserves_worst_case_and_settlement_refunds(setup):
    service, *_ = setup
    created = service.create_key("t", budget_usd=0.05, budget_period="day")
    key, key_id = created["key"], created["key_id"]
    with pytest.raises(ApiError) as caught:
        admit(service, key, prompt=10, out=100, rid="big")  # worst case $0.11
    assert caught.value.code == "budget_exceeded" and caught.value.status == 429
    admit(service, key, prompt=10, out=30, rid="a")  # reserves $0.04
    with pytest.raises(ApiError):
        admit(service, key, prompt=5, out=10, rid="b")  # $0.015 more would overrun
    asyncio.run(service.settle(row("a", key_id, 0.002)))  # it used far less
    status = service.budget_status(key_id)
    assert status["spent_usd"] == pytest.approx(0.002)
    assert status["remaining_usd"] == pytest.approx(0.048)
    admit(service, key, prompt=5, out=10, rid="b")


def test_concurrent_reservations_cannot_jointly_overspend(setup):
    service, *_ = setup
    created = service.create_key("t", budget_usd=0.1, budget_period="month")
    accepted = 0
    for i in range(20):
        try:
            admit(service, created["key"], prompt=10, out=10, rid=f"r{i}")  # $0.02 each
            accepted += 1
        except ApiError:
            pass
    assert accepted == 5


def test_alerts_fire_once_per_threshold_per_period_and_survive_restart(setup, tmp_path):
    service, clock, notifier, alerts = setup
    created = service.create_key("t", budget_usd=1.0, budget_period="day")
    key_id = created["key_id"]
    for i, cost in enumerate([0.3, 0.25, 0.1, 0.2, 0.2]):
        admit(service, created["key"], prompt=1, out=1, rid=f"r{i}")
        asyncio.run(service.settle(row(f"r{i}", key_id, cost)))
    assert [p["threshold"] for _, p in notifier.sent] == [0.5, 0.8, 1.0]
    assert [p["threshold"] for p in alerts] == [0.5, 0.8, 1.0]
    assert all(url == "http://hook" for url, _ in notifier.sent)
    # A restarted service reads spend from the ledger and does not re-fire.
    restarted = QuotaService(service.accounts, service.ledger, service.policy, "x",
                             clock=clock, notifier=notifier)
    asyncio.run(restarted.settle(row("r9", key_id, 0.01)))
    assert len(notifier.sent) == 3
    assert restarted.budget_status(key_id)["spent_usd"] == pytest.approx(1.06)
    clock.now += 86400  # next day: thresholds arm again
    asyncio.run(restarted.settle(row("next", key_id, 0.6)))
    assert [p["threshold"] for _, p in notifier.sent][-1] == 0.5


def test_settlement_is_idempotent(setup):
    service, *_ = setup
    created = service.create_key("t", budget_usd=1.0)
    asyncio.run(service.settle(row("same", created["key_id"], 0.1)))
    asyncio.run(service.settle(row("same", created["key_id"], 0.1)))
    assert service.budget_status(created["key_id"])["spent_usd"] == pytest.approx(0.1)


def test_anonymous_only_when_auth_is_off(tmp_path):
    service = QuotaService(AccountStore(tmp_path / "a.db", b"p"), UsageLedger(tmp_path / "u.db"),
                           QuotaPolicy(auth_required=False), "admin")
    assert admit(service, None)["principal"]["tenant_id"] == "anonymous"
    with pytest.raises(ApiError):
        admit(service, "sk-bogus")  # a key that is sent is still checked


def test_admin_key_comparison(setup):
    service, *_ = setup
    assert service.is_admin("admin-secret")
    assert not service.is_admin("admin-secre") and not service.is_admin(None)
