"""Admin routes of the semantic cache: invalidation by tenant, model, id, source document
or namespace, a full flush, statistics and maintenance."""
from __future__ import annotations

from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from deployments.gateway.fastapi_app import app

PREFIX = "/admin/v1/cache"


class CacheInvalidation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["tenant", "model", "id", "source", "namespace", "all"]
    value: str | None = Field(None, description="The tenant, model, entry id, source id "
                              "('doc:<id>' or 'doc:<id>@<version>') or namespace; none for all.")
    tenant: str | None = Field(None, description="Limit any kind to one tenant.")


class CacheRoutes:
    @app.post(f"{PREFIX}/invalidate")
    async def admin_cache_invalidate(self, body: CacheInvalidation,
                                     request: Request) -> dict[str, Any]:
        await self.require_admin(request)
        return await self.cache.call("invalidate", body.kind, body.value, body.tenant)

    @app.get(f"{PREFIX}/stats")
    async def admin_cache_stats(self, request: Request) -> dict[str, Any]:
        await self.require_admin(request)
        return await self.cache.call("stats")

    @app.post(f"{PREFIX}/maintain")
    async def admin_cache_maintain(self, request: Request) -> dict[str, Any]:
        """Flush buffered writes, expire, evict, compact and index now."""
        await self.require_admin(request)
        await self.cache.call("flush")
        return await self.cache.call("maintain")
