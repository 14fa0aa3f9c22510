"""Feedback on served cache hits (no Ray): the threshold rule, reports by request id and by
entry id, tenant isolation, durability across a restart, and the HTTP routes' auth rules."""
from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serve_app.cache.config import CacheFeedbackSettings, CacheSettings
from serve_app.cache.feedback import learned_threshold
from serve_app.cache.service import CacheService
from serve_app.errors import ApiError
from tests.unit.test_cache_service import Clock, completion, decide, near, vector

ACME = {"tenant_id": "acme", "key_id": "k-acme", "admin": False}
GLOBEX = {"tenant_id": "globex", "key_id": "k-globex", "admin": False}
ADMIN = {"tenant_id": None, "key_id": "admin", "admin": True}


def make(path, clock, **settings) -> CacheService:
    """Guard only (threshold 0.925) unless told: random vectors mean nothing to the
    verifier, and these tests are about what feedback does to a threshold."""
    settings.setdefault("verifier", False)
    return CacheService(CacheSettings(**settings), path / "cache", clock=clock)


@pytest.fixture
def clock():
    return Clock()


def served_hit(service, tenant="acme", prompt="What is the capital of France?",
               query="Which city is the capital of France?", similarity=0.95, seed=1,
               request_id="req-1", namespace=None):
    """Store an answer for `prompt`, then look `query` up at `similarity` -> the hit."""
    cache = {"namespace": namespace} if namespace else None
    extra = {"cache": cache} if cache else {}
    base = vector(seed)
    service.store_answer(tenant, decide(prompt=prompt, **extra), base, completion())
    hit = service.lookup(tenant, decide(prompt=query, **extra),
                         near(base, similarity, seed + 100), request_id=request_id)
    assert hit["hit"] is True, hit
    return hit, base


# ---- the rule ------------------------------------------------------------------------

def test_learned_threshold_needs_min_count_and_steps_over_the_kth_highest():
    rule = CacheFeedbackSettings(min_count=3, margin=0.005, max_threshold=0.98)
    assert learned_threshold([0.99, 0.97], rule) is None  # one or two reports move nothing
    assert learned_threshold([0.93, 0.95, 0.94], rule) == 0.935
    # The min_count-th highest decides: one outlier at 0.99 does not jump to the cap.
    assert learned_threshold([0.99, 0.95, 0.94, 0.91], rule) == 0.945
    assert learned_threshold([0.999, 0.998, 0.997], rule) == 0.98  # capped
    assert learned_threshold([0.9], CacheFeedbackSettings(min_count=1, margin=0)) == 0.9


# ---- reports -------------------------------------------------------------------------

def test_report_by_request_id_removes_the_entry_and_records_the_pair(tmp_path, clock):
    service = make(tmp_path, clock)
    hit, base = served_hit(service)
    report = service.mark_wrong(ACME, request_id="req-1", reason="wrong city")
    assert report["removed"] is True and report["entry_id"] == hit["entry_id"]
    assert report["match"] == "semantic" and report["similarity"] == pytest.approx(0.95, abs=1e-3)
    assert report["threshold"]["confirmed_wrong"] == 1 and report["threshold"]["learned"] is None
    assert service.store.get(hit["entry_id"]) is None  # mirror and table
    service.store.flush()
    assert service.store._table.count_rows() == 0
    again = service.lookup("acme", decide(prompt="Which city is the capital of France?"),
                           near(base, 0.95, 101))
    assert again["hit"] is False
    # Reporting twice is idempotent.
    twice = service.mark_wrong(ACME, request_id="req-1")
    assert twice["already_reported"] is True and twice["id"] == report["id"]
    assert twice["threshold"]["confirmed_wrong"] == 1


def test_a_reported_pair_is_not_served_again_but_other_queries_are(tmp_path, clock):
    service = make(tmp_path, clock)
    _, base = served_hit(service)
    service.mark_wrong(ACME, request_id="req-1")
    # The same cached prompt answered again (a new entry): the reported query skips it...
    service.store_answer("acme", decide(prompt="What is the capital of France?"), base,
                         completion())
    skipped = service.lookup("acme", decide(prompt="Which city is the capital of France?"),
                             near(base, 0.95, 101))
    assert skipped["hit"] is False and skipped["reason"] == "feedback"
    # ...another paraphrase, and another tenant, are unaffected.
    other = service.lookup("acme", decide(prompt="Tell me the capital of France"),
                           near(base, 0.95, 102))
    assert other["hit"] is True


def test_report_by_entry_id_and_tenant_isolation(tmp_path, clock):
    service = make(tmp_path, clock)
    hit, _ = served_hit(service, request_id="req-a")
    with pytest.raises(ApiError) as foreign:
        service.mark_wrong(GLOBEX, entry_id=hit["entry_id"])
    assert foreign.value.status == 403 and foreign.value.code == "not_your_cache_entry"
    with pytest.raises(ApiError) as foreign_request:
        service.mark_wrong(GLOBEX, request_id="req-a")
    assert foreign_request.value.status == 403
    assert service.store.get(hit["entry_id"]) is not None  # nothing happened
    for kwargs, status in (({"request_id": "nope"}, 404), ({"entry_id": "nope"}, 404),
                           ({}, 422), ({"request_id": "req-a", "entry_id": "x"}, 422)):
        with pytest.raises(ApiError) as error:
            service.mark_wrong(ACME, **kwargs)
        assert error.value.status == status
    report = service.mark_wrong(ACME, entry_id=hit["entry_id"])
    # By entry id, the newest hit served from it gives the query and the similarity.
    assert report["removed"] is True and report["match"] == "semantic"
    assert report["request_id"] is None


def test_admin_reports_any_tenant_and_unserved_entries(tmp_path, clock):
    service = make(tmp_path, clock)
    stored = service.store_answer("globex", decide(prompt="Refund policy?"), vector(5),
                                  completion())
    report = service.mark_wrong(ADMIN, entry_id=stored["id"])
    assert report["tenant"] == "globex" and report["match"] == "unserved"
    assert report["removed"] is True and report["threshold"]["confirmed_wrong"] == 0


def test_exact_hits_reported_wrong_move_no_threshold(tmp_path, clock):
    service = make(tmp_path, clock, feedback={"min_count": 1})
    base = vector(7)
    service.store_answer("acme", decide(prompt="Opening hours?"), base, completion())
    hit = service.lookup("acme", decide(prompt="opening hours"), None, exact_only=True,
                         request_id="req-exact")
    assert hit["hit"] and hit["match"] == "exact"
    report = service.mark_wrong(ACME, request_id="req-exact")
    assert report["match"] == "exact" and report["threshold"]["learned"] is None


def test_min_count_wrong_hits_raise_the_namespace_threshold_and_reset_lowers_it(tmp_path,
                                                                                clock):
    service = make(tmp_path, clock)
    for index, similarity in enumerate((0.95, 0.96, 0.97)):
        served_hit(service, prompt=f"Cached question {index}", query=f"Query {index}",
                   similarity=similarity, seed=10 + index, request_id=f"r{index}",
                   namespace="faq")
        report = service.mark_wrong(ACME, request_id=f"r{index}")
    assert report["threshold"]["confirmed_wrong"] == 3
    # 0.005 above the 3rd-highest (0.95, as float32 vectors make it), rounded up.
    assert report["threshold"]["learned"] == pytest.approx(0.955, abs=1.5e-3)
    # At 0.952 (above the configured 0.925, below the learned 0.955): a miss in "faq"...
    base = vector(40)
    for namespace in ("faq", "default"):
        service.store_answer("acme", decide(prompt="Shipping times?",
                                            cache={"namespace": namespace}), base,
                             completion())
    query = decide(prompt="How long is shipping?", cache={"namespace": "faq"})
    missed = service.lookup("acme", query, near(base, 0.952, 41))
    assert missed["hit"] is False and missed["threshold"] == report["threshold"]["learned"]
    # ...not in another namespace, nor for another tenant.
    assert service.lookup("acme", decide(prompt="How long is shipping?"),
                          near(base, 0.952, 41))["hit"] is True
    assert service.floor("globex", type("P", (), {"threshold": None, "namespace": "faq"})()) \
        == pytest.approx(0.925)
    assert service.feedback_summary("acme")["data"][0]["learned_threshold"] == \
        report["threshold"]["learned"]
    assert service.reset_feedback("acme", "faq")["deleted"] == 3
    assert service.lookup("acme", query, near(base, 0.952, 41))["hit"] is True


def test_negatives_served_hits_and_thresholds_survive_a_restart(tmp_path, clock):
    service = make(tmp_path, clock, feedback={"min_count": 2})
    for index, similarity in enumerate((0.95, 0.96)):
        served_hit(service, prompt=f"Cached question {index}", query=f"Query {index}",
                   similarity=similarity, seed=10 + index, request_id=f"r{index}")
    service.mark_wrong(ACME, request_id="r0")
    _, base = served_hit(service, prompt="Kept question", query="Kept query", seed=30,
                         request_id="r-kept")
    service.flush()
    service.close()

    reopened = make(tmp_path, clock, feedback={"min_count": 2})
    reopened.mark_wrong(ACME, request_id="r1")  # a hit served before the restart
    summary = reopened.feedback_summary("acme")["data"]
    assert summary[0]["confirmed_wrong"] == 2 and summary[0]["learned_threshold"] == pytest.approx(
        0.955, abs=1.5e-3)
    assert reopened.mark_wrong(ACME, request_id="r0")["already_reported"] is True
    # The reported pair stays blocked after the restart.
    reopened.store_answer("acme", decide(prompt="Cached question 0"), vector(10),
                          completion())
    blocked = reopened.lookup("acme", decide(prompt="Query 0"), near(vector(10), 0.99, 110))
    assert blocked["hit"] is False and blocked["reason"] == "feedback"


def test_served_hits_are_forgotten_after_their_retention(tmp_path, clock):
    service = make(tmp_path, clock, feedback={"served_retention_s": 60})
    served_hit(service, request_id="old")
    clock.now += 120
    assert service.maintain()["served_forgotten"] == 1
    with pytest.raises(ApiError) as error:
        service.mark_wrong(ACME, request_id="old")
    assert error.value.status == 404


# ---- the HTTP routes -----------------------------------------------------------------

class _CachePort:
    def __init__(self, service: CacheService) -> None:
        self.service = service

    async def call(self, method: str, *args):
        return getattr(self.service, method)(*args)


@pytest.fixture
def http(tmp_path, clock, monkeypatch):
    from deployments.gateway import cache_routes, dependencies
    from deployments.http_edge import RequestEdgeMiddleware, install_error_handlers
    from serve_app.accounts.store import AccountStore
    from serve_app.quota.ledger import UsageLedger
    from serve_app.quota.service import QuotaPolicy, QuotaService
    from serve_app.settings import StackAppSettings
    from tests.unit.test_gateway_dependencies import _QuotaPort

    admin_key = "sk-admin-" + "9" * 24
    quota = QuotaService(AccountStore(tmp_path / "a.db", b"pepper"),
                         UsageLedger(tmp_path / "u.db"), QuotaPolicy(), admin_key)
    keys = {tenant: quota.create_key(tenant)["key"] for tenant in ("acme", "globex")}
    service = make(tmp_path, clock)

    class FakeGateway:
        settings = StackAppSettings(data_dir=tmp_path)

    gateway = FakeGateway()
    gateway.quota = _QuotaPort(quota)
    gateway.cache = _CachePort(service)
    monkeypatch.setattr(dependencies, "_gateway", gateway)
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestEdgeMiddleware)
    app.include_router(cache_routes.router)
    headers = {name: {"authorization": f"Bearer {key}"} for name, key in keys.items()}
    headers["admin"] = {"authorization": f"Bearer {admin_key}"}
    return TestClient(app), headers, service


def test_feedback_route_auth_and_errors(http):
    client, headers, service = http
    hit, _ = served_hit(service, request_id="req-http")
    foreign = client.post("/v1/cache/feedback", json={"request_id": "req-http"},
                          headers=headers["globex"])
    assert foreign.status_code == 403
    assert foreign.json()["error"]["type"] == "permission_error"
    unknown = client.post("/v1/cache/feedback", json={"request_id": "nope"},
                          headers=headers["acme"])
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "cache_hit_not_found"
    for bad in ({}, {"request_id": "a", "entry_id": "b"}, {"request_id": "x" * 200},
                {"request_id": "a", "extra": 1}):
        response = client.post("/v1/cache/feedback", json=bad, headers=headers["acme"])
        assert response.status_code == 422 and "error" in response.json()
    assert client.post("/v1/cache/feedback", json={"request_id": "req-http"}).status_code == 401
    done = client.post("/v1/cache/feedback", json={"request_id": "req-http"},
                       headers=headers["acme"])
    assert done.status_code == 200 and done.json()["removed"] is True
    assert done.json()["entry_id"] == hit["entry_id"]
    summary = client.get("/v1/cache/feedback", headers=headers["acme"]).json()
    assert summary["tenant"] == "acme" and summary["data"][0]["negatives"] == 1
    assert client.get("/v1/cache/feedback?tenant=acme",
                      headers=headers["globex"]).status_code == 403
    assert client.get("/v1/cache/feedback?tenant=acme",
                      headers=headers["admin"]).json()["data"][0]["negatives"] == 1


def test_admin_marks_any_tenant_and_only_admin_resets(http):
    client, headers, service = http
    served_hit(service, tenant="globex", request_id="req-g")
    marked = client.post("/v1/cache/feedback", json={"request_id": "req-g"},
                         headers=headers["admin"])
    assert marked.status_code == 200 and marked.json()["tenant"] == "globex"
    assert client.delete("/admin/v1/cache/feedback?tenant=globex",
                         headers=headers["globex"]).status_code == 403
    assert client.delete("/admin/v1/cache/feedback?tenant=globex&namespace=bad%20name",
                         headers=headers["admin"]).status_code == 422
    reset = client.delete("/admin/v1/cache/feedback?tenant=globex", headers=headers["admin"])
    assert reset.status_code == 200 and reset.json()["deleted"] == 1
