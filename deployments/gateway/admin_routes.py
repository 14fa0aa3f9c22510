"""Admin API (admin key only): keys, limits, budgets, usage. The CLI
`python -m serve_app.admin` calls these routes."""
from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from deployments.gateway.fastapi_app import api_key_of, app
from serve_app.admin_protocol import KeyCreate, KeyRotate, KeyUpdate
from serve_app.errors import ApiError
from serve_app.http_edge import context_of

PREFIX = "/admin/v1"


class AdminRoutes:
    async def require_admin(self, request: Request) -> None:
        token = api_key_of(request)
        if not token:
            raise ApiError(401, "The admin API needs 'Authorization: Bearer <admin key>'.",
                           code="missing_api_key")
        if not await self.quota.call("is_admin", token):
            raise ApiError(403, "This key is not the admin key.", code="not_admin")
        context_of(request).extra["admin"] = True

    @app.get(f"{PREFIX}/tenants")
    async def admin_tenants(self, request: Request) -> dict[str, Any]:
        await self.require_admin(request)
        return {"data": await self.quota.call("tenants")}

    @app.post(f"{PREFIX}/keys", status_code=201)
    async def admin_create_key(self, body: KeyCreate, request: Request) -> JSONResponse:
        await self.require_admin(request)
        fields = body.model_dump(exclude_none=True, exclude={"tenant_id"})
        created = await self.quota.call("create_key", body.tenant_id, fields)
        return JSONResponse(created, status_code=201)

    @app.get(f"{PREFIX}/keys")
    async def admin_list_keys(self, request: Request,
                              tenant_id: str | None = None) -> dict[str, Any]:
        await self.require_admin(request)
        return {"data": await self.quota.call("list_keys", tenant_id)}

    @app.get(f"{PREFIX}/keys/{{key_id}}")
    async def admin_get_key(self, key_id: str, request: Request) -> dict[str, Any]:
        await self.require_admin(request)
        return await self.quota.call("get_key", key_id)

    @app.patch(f"{PREFIX}/keys/{{key_id}}")
    async def admin_update_key(self, key_id: str, body: KeyUpdate,
                               request: Request) -> dict[str, Any]:
        """Set limits, budget, models, expiry; fields sent as null clear a limit."""
        await self.require_admin(request)
        return await self.quota.call("update_key", key_id, body.model_dump(exclude_unset=True))

    @app.post(f"{PREFIX}/keys/{{key_id}}/disable")
    async def admin_disable_key(self, key_id: str, request: Request) -> dict[str, Any]:
        await self.require_admin(request)
        return await self.quota.call("update_key", key_id, {"disabled": True})

    @app.post(f"{PREFIX}/keys/{{key_id}}/enable")
    async def admin_enable_key(self, key_id: str, request: Request) -> dict[str, Any]:
        await self.require_admin(request)
        return await self.quota.call("update_key", key_id, {"disabled": False})

    @app.post(f"{PREFIX}/keys/{{key_id}}/rotate")
    async def admin_rotate_key(self, key_id: str, request: Request,
                               body: KeyRotate | None = None) -> dict[str, Any]:
        await self.require_admin(request)
        return await self.quota.call("rotate_key", key_id, (body or KeyRotate()).grace_s)

    @app.get(f"{PREFIX}/keys/{{key_id}}/budget")
    async def admin_key_budget(self, key_id: str, request: Request) -> dict[str, Any]:
        await self.require_admin(request)
        return await self.quota.call("budget", key_id)

    @app.get(f"{PREFIX}/usage")
    async def admin_usage(self, request: Request, group_by: str = "key",
                          start: float | None = None, end: float | None = None,
                          tenant_id: str | None = None,
                          key_id: str | None = None) -> dict[str, Any]:
        """Requests, tokens, cost, cache hits and savings grouped by key, tenant, model,
        tier or route over [start, end) (epoch seconds)."""
        await self.require_admin(request)
        rows = await self.quota.call("usage_summary", {
            "group_by": group_by, "start": start, "end": end, "tenant_id": tenant_id,
            "key_id": key_id})
        return {"group_by": group_by, "start": start, "end": end, "data": rows}

    @app.get(f"{PREFIX}/usage/requests")
    async def admin_usage_rows(self, request: Request, start: float | None = None,
                               end: float | None = None, tenant_id: str | None = None,
                               key_id: str | None = None, client_request_id: str | None = None,
                               limit: int = 100) -> dict[str, Any]:
        """Usage rows, newest first. `client_request_id` (a caller's x-request-id) is only
        unique within a tenant, so it needs `tenant_id`."""
        await self.require_admin(request)
        rows = await self.quota.call("usage_rows", {
            "start": start, "end": end, "tenant_id": tenant_id, "key_id": key_id,
            "client_request_id": client_request_id, "limit": max(1, min(limit, 10_000))})
        return {"data": rows}

    @app.get(f"{PREFIX}/usage/requests/{{request_id}}")
    async def admin_usage_row(self, request_id: str, request: Request) -> dict[str, Any]:
        await self.require_admin(request)
        row = await self.quota.call("usage_row", request_id)
        if row is None:
            raise ApiError(404, f"no usage row for request {request_id}", code="not_found")
        return row
