"""The Gateway's one authentication dependency and the scoping built on it (no Ray)."""
from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from deployments.gateway import dependencies
from deployments.gateway.dependencies import Caller, CallerDep, AdminDep, tenant_scope
from deployments.http_edge import RequestEdgeMiddleware, install_error_handlers
from serve_app.errors import ApiError
from serve_app.quota.service import QuotaService
from serve_app.settings import StackAppSettings


class _QuotaPort:
    """The Quota client's `call` over a real QuotaService (in memory)."""

    def __init__(self, service: QuotaService) -> None:
        self.service = service
        self.calls: list[str] = []

    async def call(self, method: str, *args):
        self.calls.append(method)
        return getattr(self.service, method)(*args)

    async def caller(self, token, check_keys):
        return await self.call("caller", token, check_keys)


@pytest.fixture
def client(tmp_path, monkeypatch):
    from serve_app.accounts.store import AccountStore
    from serve_app.quota.ledger import UsageLedger
    from serve_app.quota.service import QuotaPolicy

    service = QuotaService(AccountStore(tmp_path / "a.db", b"pepper"),
                           UsageLedger(tmp_path / "u.db"), QuotaPolicy(), "sk-admin-" + "9" * 24)
    key = service.create_key("acme")["key"]

    class FakeGateway:
        settings = StackAppSettings(data_dir=tmp_path)
        quota = _QuotaPort(service)

    gateway = FakeGateway()
    monkeypatch.setattr(dependencies, "_gateway", gateway)
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestEdgeMiddleware)

    @app.get("/who")
    async def who(caller: CallerDep) -> dict:
        return {"tenant": caller.tenant_id, "admin": caller.admin}

    @app.get("/admin-only")
    async def admin_only(admin: AdminDep) -> dict:
        return {"ok": True}

    return TestClient(app), key, gateway.quota


def test_one_quota_call_names_every_kind_of_caller(client):
    http, key, quota = client
    assert http.get("/who", headers={"authorization": f"Bearer {key}"}).json() == {
        "tenant": "acme", "admin": False}
    admin = {"authorization": "Bearer sk-admin-" + "9" * 24}
    assert http.get("/who", headers=admin).json() == {"tenant": None, "admin": True}
    assert quota.calls == ["caller", "caller"]
    assert http.get("/who", headers={"authorization": "Bearer sk-wrong"}).status_code == 401
    assert http.get("/who").status_code == 401  # keys are required by default


def test_admin_routes_refuse_tenant_keys_and_missing_keys(client):
    http, key, _ = client
    assert http.get("/admin-only", headers={"authorization": f"Bearer {key}"}).status_code == 403
    refused = http.get("/admin-only")
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"


def test_tenant_scope():
    tenant_key = Caller(tenant_id="acme", key_id="k1")
    admin = Caller(tenant_id=None, key_id="admin", admin=True)
    assert tenant_scope(tenant_key, None) == "acme"
    assert tenant_scope(admin, "globex") == "globex"
    with pytest.raises(ApiError) as other:
        tenant_scope(tenant_key, "globex")
    assert other.value.status == 403
    with pytest.raises(ApiError) as unnamed:
        tenant_scope(admin, None)
    assert unnamed.value.status == 400
