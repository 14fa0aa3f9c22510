"""Admin routes of the semantic cache: invalidation by tenant, model, id, source document
or namespace, a full flush, statistics and maintenance."""
from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from deployments.gateway.dependencies import AdminDep, GatewayDep

router = APIRouter(prefix="/admin/v1/cache")


class CacheInvalidation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["tenant", "model", "id", "source", "namespace", "all"]
    value: str | None = Field(None, description="The tenant, model, entry id, source id "
                              "('doc:<id>' or 'doc:<id>@<version>') or namespace; none for all.")
    tenant: str | None = Field(None, description="Limit any kind to one tenant.")


@router.post("/invalidate")
async def admin_cache_invalidate(body: CacheInvalidation, gateway: GatewayDep,
                                 admin: AdminDep) -> dict[str, Any]:
    return await gateway.cache.call("invalidate", body.kind, body.value, body.tenant)


@router.get("/stats")
async def admin_cache_stats(gateway: GatewayDep, admin: AdminDep) -> dict[str, Any]:
    return await gateway.cache.call("stats")


@router.post("/maintain")
async def admin_cache_maintain(gateway: GatewayDep, admin: AdminDep) -> dict[str, Any]:
    """Flush buffered writes, expire, evict, compact and index now."""
    await gateway.cache.call("flush")
    return await gateway.cache.call("maintain")
