"""The semantic cache's part of a chat request: plan, look up, serve a hit, store a miss.

The query text is embedded once; the vector is reused by the router and the retriever.
A failing cache is a miss, never a failed request.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from serve_app.cache.config import CacheSettings
from serve_app.cache.policy import CacheDecision, plan_cache
from serve_app.cache.replay import cached_completion, completion_chunks, estimated_saving_usd
from serve_app.errors import ApiError, is_error_payload
from serve_app.quota.pricing import Price
from serve_app.rag.prompting import sources_header
from serve_app.gateway.request_context import RequestContext

Embed = Callable[[list[str]], Awaitable[list[list[float]]]]


class CachePort(Protocol):
    async def lookup(self, tenant: str, decision: dict[str, Any],
                     vector: list[float] | None, exact_only: bool = False,
                     request_id: str | None = None) -> dict[str, Any]: ...

    def store(self, tenant: str, decision: dict[str, Any], vector: list[float] | None,
              completion: dict[str, Any], source_ids: list[str] | None,
              tier: str | None) -> None: ...

    def record_saving(self, usd: float, model: str) -> None: ...


@dataclass
class CacheStep:
    """One request's cache state: the decision, the query vector, the best similarity."""

    decision: CacheDecision
    vector: list[float] | None = None
    similarity: float | None = None
    hit: dict[str, Any] | None = None


@dataclass
class CachedAnswer:
    headers: dict[str, str]
    body: dict[str, Any] | None
    chunks: list[dict[str, Any]] | None


class CacheStage:
    def __init__(self, cache: CachePort | None, settings: CacheSettings, embed: Embed | None,
                 price_of: Callable[[str], Price], max_sources_header_bytes: int) -> None:
        self.cache = cache if settings.enabled else None
        self.settings = settings
        self.embed = embed
        self.price_of = price_of
        self.max_sources_header_bytes = max_sources_header_bytes

    async def lookup(self, raw: dict[str, Any], headers: Mapping[str, str],
                     principal: Mapping[str, Any], ctx: RequestContext) -> CacheStep | None:
        """None when the cache is off or the request is not cacheable (x-cache: bypass)."""
        if self.cache is None:
            return None
        decision = plan_cache(raw, headers, self.settings,
                              allow_sampled=bool(principal.get("cache_sampled")))
        if not decision.cacheable:
            ctx.cache = "bypass"
            ctx.extra["cache_reason"] = decision.reason
            return None
        step = CacheStep(decision=decision)
        if decision.lookup and decision.semantic and self.embed is not None:
            # The fast path: an exact repeat (normalised-prompt hash, tenant and scope) is
            # answered before the query is embedded.
            started = time.perf_counter()
            probe = await self.cache.lookup(ctx.tenant or "", decision.to_dict(), None,
                                            exact_only=True, request_id=ctx.request_id)
            ctx.stage("cache_exact", started)
            if not is_error_payload(probe) and probe.get("hit"):
                step.similarity = probe.get("similarity")
                ctx.cache = "hit"
                step.hit = probe
                return step
        if decision.semantic and self.embed is not None:
            started = time.perf_counter()
            try:
                step.vector = (await self.embed([decision.query_text]))[0]
            except ApiError:
                step.vector = None  # exact matches still work without the embedder
            ctx.stage("embed", started)
        if not decision.lookup:  # no_cache: skip the lookup, still refresh the entry
            ctx.cache = "bypass"
            ctx.extra["cache_reason"] = decision.reason
            return step
        started = time.perf_counter()
        result = await self.cache.lookup(ctx.tenant or "", decision.to_dict(), step.vector,
                                         request_id=ctx.request_id)
        ctx.stage("cache_lookup", started)
        if is_error_payload(result):
            ctx.cache = "miss"
            ctx.extra["cache_reason"] = "cache_unavailable"
            return step
        step.similarity = result.get("similarity")
        if result.get("hit"):
            ctx.cache = "hit"
            step.hit = result
        else:
            ctx.cache = "miss"
            ctx.extra["cache_reason"] = result.get("reason")
        return step

    def answer(self, step: CacheStep, ctx: RequestContext, *, stream: bool,
               include_usage: bool) -> CachedAnswer:
        """The hit as a response: usage 0 and cost 0; the ledger gets what it saved."""
        hit = step.hit or {}
        ctx.extra["cache_entry"] = hit.get("entry_id")
        model = hit.get("model") or ""
        ctx.model = model
        ctx.tier = hit.get("tier") or None
        ctx.tokens_in = ctx.tokens_out = 0
        ctx.cost_usd = 0.0
        price = self.price_of(model)
        saved = estimated_saving_usd(hit.get("usage"), price.input_per_mtok,
                                     price.output_per_mtok)
        ctx.extra["saved_usd"] = saved
        if saved and self.cache is not None:
            self.cache.record_saving(saved, model)
        headers = {"x-model": model}
        if ctx.tier:
            headers["x-route-tier"] = ctx.tier
        sources = hit["completion"].get("sources")
        if sources:
            headers["x-rag-sources"] = sources_header(sources, self.max_sources_header_bytes)
            ctx.extra["sources"] = [s.get("source_id") for s in sources]
        if not stream:
            return CachedAnswer(headers, cached_completion(hit["completion"]), None)
        chunks = completion_chunks(hit["completion"], include_usage=include_usage)
        if sources and chunks:
            chunks[0]["sources"] = sources
        return CachedAnswer(headers, None, chunks)

    def store(self, step: CacheStep, ctx: RequestContext, body: dict[str, Any],
              source_ids: list[str] | None) -> None:
        if self.cache is None or not step.decision.store:
            return
        self.cache.store(ctx.tenant or "", step.decision.to_dict(), step.vector, body,
                         source_ids, ctx.tier)


def cache_headers(ctx: RequestContext, step: CacheStep | None) -> dict[str, str]:
    headers = {"x-cache": ctx.cache or "bypass"}
    if step is not None and step.similarity is not None:
        headers["x-cache-similarity"] = f"{step.similarity:.4f}"
    if ctx.extra.get("cache_entry"):
        headers["x-cache-entry"] = str(ctx.extra["cache_entry"])
    if ctx.extra.get("cache_reason"):
        headers["x-cache-reason"] = str(ctx.extra["cache_reason"])
    return headers


async def replay(chunks: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for chunk in chunks:
        yield chunk
