"""Routes of the semantic cache: feedback on served answers (tenant keys and the admin
key), and the admin routes: invalidation by tenant, model, id, source document or
namespace, feedback resets, statistics and maintenance.

Feedback is checked in the SemanticCache from the caller's principal passed here: a tenant
key reports its own tenant's hits only (403 for another's), the admin key any."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.gateway.dependencies import AdminDep, CallerDep, GatewayDep, tenant_scope
from serve_app.cache.config import NAMESPACE_PATTERN

ADMIN = "/admin/v1/cache"
router = APIRouter()

_ID = r"^[A-Za-z0-9._:-]{1,128}$"


class CacheInvalidation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["tenant", "model", "id", "source", "namespace", "all"]
    value: str | None = Field(None, description="The tenant, model, entry id, source id "
                              "('doc:<id>' or 'doc:<id>@<version>') or namespace; none for all.")
    tenant: str | None = Field(None, description="Limit any kind to one tenant.")


class CacheFeedback(BaseModel):
    """Body of POST /v1/cache/feedback: which served answer was wrong."""

    model_config = ConfigDict(extra="forbid")

    request_id: str | None = Field(
        None, pattern=_ID, description="The response's x-llmstack-request-id.")
    entry_id: str | None = Field(
        None, pattern=_ID, description="The response's x-cache-entry.")
    reason: str | None = Field(None, max_length=500, description="Free text, kept with it.")

    @model_validator(mode="after")
    def _one_id(self) -> "CacheFeedback":
        if (self.request_id is None) == (self.entry_id is None):
            raise ValueError("give exactly one of request_id (x-llmstack-request-id) and "
                             "entry_id (x-cache-entry)")
        return self


@router.post("/v1/cache/feedback")
async def cache_feedback(body: CacheFeedback, gateway: GatewayDep,
                         caller: CallerDep) -> dict[str, Any]:
    """Mark a served cached answer wrong: its entry is removed, the (query, cached
    prompt) pair is never served again, and the namespace's threshold learns from it."""
    return await gateway.cache.call("mark_wrong", caller.principal(), body.request_id,
                                    body.entry_id, body.reason)


@router.get("/v1/cache/feedback")
async def cache_feedback_summary(gateway: GatewayDep, caller: CallerDep,
                                 tenant: str | None = None) -> dict[str, Any]:
    """Per namespace: reports, confirmed-wrong semantic hits, the learned threshold."""
    return await gateway.cache.call("feedback_summary", tenant_scope(caller, tenant))


@router.delete(ADMIN + "/feedback")
async def admin_cache_feedback_reset(
        gateway: GatewayDep, admin: AdminDep, tenant: Annotated[str, Query(min_length=1)],
        namespace: Annotated[str | None, Query(pattern=NAMESPACE_PATTERN)] = None,
) -> dict[str, Any]:
    """Forget a tenant's reports (one namespace, or all) and the thresholds they raised."""
    return await gateway.cache.call("reset_feedback", tenant, namespace)


@router.post(ADMIN + "/invalidate")
async def admin_cache_invalidate(body: CacheInvalidation, gateway: GatewayDep,
                                 admin: AdminDep) -> dict[str, Any]:
    return await gateway.cache.call("invalidate", body.kind, body.value, body.tenant)


@router.get(ADMIN + "/stats")
async def admin_cache_stats(gateway: GatewayDep, admin: AdminDep) -> dict[str, Any]:
    return await gateway.cache.call("stats")


@router.get(ADMIN + "/namespaces")
async def admin_cache_namespaces(gateway: GatewayDep, admin: AdminDep,
                                 tenant: Annotated[str | None, Query(pattern=_ID)] = None
                                 ) -> dict[str, Any]:
    """Per tenant and namespace: entries, and lookups, hits, hit rate and similarity
    histograms (of hits and of misses' best candidates) since the cache replica started."""
    return {"object": "list", "data": await gateway.cache.call("namespaces", tenant)}


@router.get(ADMIN + "/entries")
async def admin_cache_entries(gateway: GatewayDep, admin: AdminDep,
                              tenant: Annotated[str | None, Query(pattern=_ID)] = None,
                              namespace: Annotated[str | None, Query(
                                  pattern=NAMESPACE_PATTERN)] = None,
                              limit: Annotated[int, Query(ge=1, le=1000)] = 100
                              ) -> dict[str, Any]:
    """The newest entries (prompt cut to 300 characters, no answer), optionally of one
    tenant and namespace."""
    return {"object": "list",
            "data": await gateway.cache.call("entries", tenant, namespace, limit)}


@router.post(ADMIN + "/maintain")
async def admin_cache_maintain(gateway: GatewayDep, admin: AdminDep) -> dict[str, Any]:
    """Flush buffered writes, expire, evict, compact and index now."""
    await gateway.cache.call("flush")
    return await gateway.cache.call("maintain")
