"""SemanticCache: one replica owns the LanceDB cache table (LanceDB wants one writer).

Thin shell over serve_app.cache.service.CacheService: blocking table work runs in
threads, a background task flushes buffered inserts and hit counts every
`flush_interval_s` and runs expiry, eviction, compaction and indexing every
`maintenance_interval_s`. Errors return as ApiError payloads.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray import serve

from deployments.metrics import RayCacheMetrics
from serve_app.errors import error_boundary
from serve_app.settings import StackAppSettings

logger = logging.getLogger("ray.serve")

# A failing cache costs a miss, never the request.
@serve.deployment(name="SemanticCache", num_replicas=1, max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0.25})
@error_boundary("semantic cache", code="cache_unavailable")
class SemanticCache:
    def __init__(self, settings: dict[str, Any]) -> None:
        # LanceDB is imported here, in the replica, not where the app graph is built.
        from serve_app.cache.service import CacheService, cache_uri

        stack = StackAppSettings.model_validate(settings)
        self.settings = stack.cache
        self.service = CacheService(self.settings, cache_uri(self.settings, stack.data_dir),
                                    metrics=RayCacheMetrics(), data_dir=stack.data_dir)
        self._task: asyncio.Task[None] | None = None
        self._start_background()

    # ---- request path (the Gateway) --------------------------------------------------

    async def lookup(self, tenant: str, decision: dict[str, Any],
                     vector: list[float] | None, exact_only: bool = False,
                     request_id: str | None = None) -> dict[str, Any]:
        self._start_background()
        return await asyncio.to_thread(self.service.lookup, tenant, decision, vector,
                                       exact_only, request_id)

    async def store(self, tenant: str, decision: dict[str, Any], vector: list[float] | None,
                    completion: dict[str, Any], source_ids: list[str] | None = None,
                    tier: str | None = None) -> dict[str, Any]:
        self._start_background()
        return await asyncio.to_thread(self.service.store_answer, tenant, decision, vector,
                                       completion, source_ids=source_ids, tier=tier)

    async def record_saving(self, usd: float, model: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.service.record_saving, usd, model)

    # ---- administration --------------------------------------------------------------

    async def invalidate(self, kind: str, value: str | None = None,
                         tenant: str | None = None) -> dict[str, Any]:
        return await asyncio.to_thread(self.service.invalidate, kind, value, tenant)

    async def mark_wrong(self, principal: dict[str, Any], request_id: str | None = None,
                         entry_id: str | None = None,
                         reason: str | None = None) -> dict[str, Any]:
        return await asyncio.to_thread(self.service.mark_wrong, principal, request_id,
                                       entry_id, reason)

    async def feedback_summary(self, tenant: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.service.feedback_summary, tenant)

    async def reset_feedback(self, tenant: str, namespace: str | None = None) -> dict[str, Any]:
        return await asyncio.to_thread(self.service.reset_feedback, tenant, namespace)

    async def stats(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.service.stats)

    async def namespaces(self, tenant: str | None = None) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.service.namespaces, tenant)

    async def entries(self, tenant: str | None = None, namespace: str | None = None,
                      limit: int = 100) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.service.entries, tenant, namespace, limit)

    async def flush(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.service.flush)

    async def maintain(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.service.maintain, force_compaction=True)

    # ---- background work -------------------------------------------------------------

    def _start_background(self) -> None:
        if self._task is not None and not self._task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # started by the first call instead
        self._task = loop.create_task(self._background())

    async def _background(self) -> None:
        last_maintenance = time.monotonic()
        while True:
            await asyncio.sleep(self.settings.flush_interval_s)
            try:
                if self.service.pending_writes:  # hit counts: at maintenance
                    await asyncio.to_thread(self.service.flush, hits=False)
                if time.monotonic() - last_maintenance >= self.settings.maintenance_interval_s:
                    last_maintenance = time.monotonic()
                    await asyncio.to_thread(self.service.maintain)
            except Exception:
                logger.exception("semantic cache background work failed; retrying")

    async def check_health(self) -> None:
        self._start_background()

    async def __del__(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            await asyncio.to_thread(self.service.close)
        except Exception:
            logger.exception("semantic cache: final flush failed")
