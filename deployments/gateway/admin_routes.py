"""Admin API (admin key only): keys, limits, budgets, usage. The CLI
`python -m serve_app.admin` calls these routes."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from deployments.gateway.dependencies import AdminDep, GatewayDep
from serve_app.admin_protocol import KeyCreate, KeyRotate, KeyUpdate
from serve_app.errors import ApiError
from serve_app.quota.ledger import MAX_INTERVAL_S, MIN_INTERVAL_S

router = APIRouter(prefix="/admin/v1")


@router.get("/tenants")
async def admin_tenants(gateway: GatewayDep, admin: AdminDep) -> dict[str, Any]:
    return {"data": await gateway.quota.call("tenants")}


@router.post("/keys", status_code=201)
async def admin_create_key(body: KeyCreate, gateway: GatewayDep,
                           admin: AdminDep) -> JSONResponse:
    fields = body.model_dump(exclude_none=True, exclude={"tenant_id"})
    created = await gateway.quota.create_key(body.tenant_id, fields)
    return JSONResponse(created, status_code=201)


@router.get("/keys")
async def admin_list_keys(gateway: GatewayDep, admin: AdminDep,
                          tenant_id: str | None = None) -> dict[str, Any]:
    return {"data": await gateway.quota.call("list_keys", tenant_id)}


@router.get("/keys/{key_id}")
async def admin_get_key(key_id: str, gateway: GatewayDep, admin: AdminDep) -> dict[str, Any]:
    return await gateway.quota.call("get_key", key_id, key=key_id)


@router.patch("/keys/{key_id}")
async def admin_update_key(key_id: str, body: KeyUpdate, gateway: GatewayDep,
                           admin: AdminDep) -> dict[str, Any]:
    """Set limits, budget, models, expiry; fields sent as null clear a limit."""
    return await gateway.quota.call("update_key", key_id, body.model_dump(exclude_unset=True),
                                  key=key_id)


@router.post("/keys/{key_id}/disable")
async def admin_disable_key(key_id: str, gateway: GatewayDep,
                            admin: AdminDep) -> dict[str, Any]:
    return await gateway.quota.call("update_key", key_id, {"disabled": True}, key=key_id)


@router.post("/keys/{key_id}/enable")
async def admin_enable_key(key_id: str, gateway: GatewayDep, admin: AdminDep) -> dict[str, Any]:
    return await gateway.quota.call("update_key", key_id, {"disabled": False}, key=key_id)


@router.post("/keys/{key_id}/rotate")
async def admin_rotate_key(key_id: str, gateway: GatewayDep, admin: AdminDep,
                           body: KeyRotate | None = None) -> dict[str, Any]:
    return await gateway.quota.call("rotate_key", key_id, (body or KeyRotate()).grace_s,
                                  key=key_id)


@router.get("/keys/{key_id}/budget")
async def admin_key_budget(key_id: str, gateway: GatewayDep, admin: AdminDep) -> dict[str, Any]:
    return await gateway.quota.call("budget", key_id, key=key_id)


@router.get("/usage")
async def admin_usage(gateway: GatewayDep, admin: AdminDep,
                      group_by: Literal["key", "tenant", "model", "tier", "route"] = "key",
                      start: float | None = None, end: float | None = None,
                      tenant_id: str | None = None, key_id: str | None = None,
                      interval_s: Annotated[int | None, Query(
                          ge=MIN_INTERVAL_S, le=MAX_INTERVAL_S)] = None) -> dict[str, Any]:
    """Requests, tokens, cost, cache hits, savings, errors and fallbacks grouped by key,
    tenant, model, tier or route over [start, end) (epoch seconds); with `interval_s`,
    per time bucket too (a time series, oldest first)."""
    rows = await gateway.quota.call("usage_summary", {
        "group_by": group_by, "start": start, "end": end, "tenant_id": tenant_id,
        "key_id": key_id, "interval_s": interval_s})
    return {"group_by": group_by, "start": start, "end": end, "interval_s": interval_s,
            "data": rows}


@router.get("/usage/requests")
async def admin_usage_rows(gateway: GatewayDep, admin: AdminDep, start: float | None = None,
                           end: float | None = None, tenant_id: str | None = None,
                           key_id: str | None = None, client_request_id: str | None = None,
                           limit: int = 100) -> dict[str, Any]:
    """Usage rows, newest first. `client_request_id` (a caller's x-request-id) is only
    unique within a tenant, so it needs `tenant_id`."""
    rows = await gateway.quota.call("usage_rows", {
        "start": start, "end": end, "tenant_id": tenant_id, "key_id": key_id,
        "client_request_id": client_request_id, "limit": max(1, min(limit, 10_000))})
    return {"data": rows}


@router.get("/usage/requests/{request_id}")
async def admin_usage_row(request_id: str, gateway: GatewayDep,
                          admin: AdminDep) -> dict[str, Any]:
    row = await gateway.quota.call("usage_row", request_id)
    if row is None:
        raise ApiError(404, f"no usage row for request {request_id}", code="not_found")
    return row
