"""CacheService: settings + policy results + store + guard, with plain-dict inputs and
outputs (what crosses a deployment handle). No Ray here; the SemanticCache deployment
adds the background flush/maintenance loop and Ray metrics.

Every method raises `ApiError` for bad input; the deployment turns it into a payload.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from serve_app.cache.config import DEFAULT_NAMESPACE, CacheSettings
from serve_app.cache.guard import PairGuard
from serve_app.cache.policy import CacheDecision
from serve_app.cache.replay import is_storable
from serve_app.cache.store import INVALIDATION_KINDS, NEVER, CacheEntry, CacheStore
from serve_app.errors import ApiError

MAX_SOURCE_IDS = 64
MAX_ID_CHARS = 512  # RAG source ids reach ~475 characters


class CacheMetrics(Protocol):
    def hit(self, match: str, similarity: float, namespace: str) -> None: ...
    def miss(self, reason: str, namespace: str) -> None: ...
    def lookup_seconds(self, seconds: float) -> None: ...
    def entries(self, count: int) -> None: ...
    def evicted(self, count: int, reason: str) -> None: ...
    def saved(self, usd: float, model: str) -> None: ...


class NullMetrics:
    def hit(self, match: str, similarity: float, namespace: str) -> None:
        pass

    def miss(self, reason: str, namespace: str) -> None:
        pass

    def lookup_seconds(self, seconds: float) -> None:
        pass

    def entries(self, count: int) -> None:
        pass

    def evicted(self, count: int, reason: str) -> None:
        pass

    def saved(self, usd: float, model: str) -> None:
        pass


def cache_uri(settings: CacheSettings, data_dir: Path | str) -> str | Path:
    return settings.uri or Path(data_dir) / "semantic_cache"


class CacheService:
    def __init__(self, settings: CacheSettings, uri: str | Path, *,
                 metrics: CacheMetrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.metrics: CacheMetrics = metrics or NullMetrics()
        self.clock = clock
        self.guard = (PairGuard(short_text_tokens=settings.guard_short_text_tokens)
                      if settings.guard else None)
        self.store = CacheStore(
            uri, table_name=settings.table_name, dim=settings.embedding_dim,
            batch_size=settings.insert_batch_size,
            search_candidates=settings.search_candidates,
            index_threshold=settings.index_build_threshold, index_type=settings.index_type,
            compact_after_fragments=settings.compact_after_fragments,
            cleanup_older_than_s=settings.cleanup_older_than_s,
            memory_index=settings.memory_index)
        self.counts = {"hits": 0, "misses": 0, "stores": 0, "saved_usd": 0.0}

    # ---- the request path ------------------------------------------------------------

    def lookup(self, tenant: str, decision: Mapping[str, Any],
               vector: Sequence[float] | None, exact_only: bool = False) -> dict[str, Any]:
        """-> {"hit": True, "completion", "similarity", "match", ...} or {"hit": False, ...}
        `exact_only`: the normalised-prompt hash only, asked before the query is embedded;
        its miss is not counted (the full lookup that follows counts it)."""
        started = time.perf_counter()
        plan = _decision(decision)
        tenant = _tenant(tenant)
        threshold = plan.threshold or self.settings.threshold_for(plan.namespace)
        if not plan.lookup:
            return self._miss(plan, f"skipped:{plan.reason}", None, threshold, started)
        try:
            outcome = self.store.lookup(
                tenant=tenant, scope_key=plan.scope_key, prompt_hash=plan.prompt_hash,
                vector=vector, threshold=threshold, now=self.clock(),
                query_text=plan.query_text, guard=self.guard.check if self.guard else None,
                semantic=plan.semantic and not exact_only)
        except ValueError as exc:
            raise ApiError(400, f"cache lookup: {exc}", code="invalid_cache_request") from exc
        if outcome.hit is None and exact_only:
            return {"hit": False, "reason": "no_exact_match", "threshold": threshold,
                    "similarity": None, "probe": True}
        if outcome.hit is None:
            return self._miss(plan, outcome.rejected or "miss", outcome.best_similarity,
                              threshold, started)
        hit = outcome.hit
        self.store.record_hit(hit.entry_id, self.clock())
        self.counts["hits"] += 1
        self.metrics.hit(hit.match, hit.similarity, self._metric_namespace(plan.namespace))
        elapsed = time.perf_counter() - started
        self.metrics.lookup_seconds(elapsed)
        completion = hit.completion()
        return {"hit": True, "match": hit.match, "similarity": round(hit.similarity, 4),
                "threshold": threshold, "entry_id": hit.entry_id, "completion": completion,
                "usage": completion.get("usage"), "model": hit.model, "tier": hit.tier,
                "namespace": hit.namespace, "source_ids": list(hit.source_ids),
                "created_at": hit.created_at, "cached_prompt": hit.prompt,
                "lookup_ms": round(elapsed * 1000, 3)}

    def _metric_namespace(self, namespace: str) -> str:
        """Namespaces named in the settings, else "other": clients choose namespaces, and
        metric tags must stay few."""
        known = (namespace == DEFAULT_NAMESPACE or namespace in self.settings.namespace_thresholds
                 or namespace in self.settings.namespace_ttl_s)
        return namespace if known else "other"

    def _miss(self, plan: CacheDecision, reason: str, similarity: float | None,
              threshold: float, started: float) -> dict[str, Any]:
        self.counts["misses"] += 1
        self.metrics.miss(reason, self._metric_namespace(plan.namespace))
        elapsed = time.perf_counter() - started
        self.metrics.lookup_seconds(elapsed)
        return {"hit": False, "reason": reason, "threshold": threshold,
                "similarity": None if similarity is None else round(similarity, 4),
                "lookup_ms": round(elapsed * 1000, 3)}

    def store_answer(self, tenant: str, decision: Mapping[str, Any],
                     vector: Sequence[float] | None, completion: Mapping[str, Any], *,
                     source_ids: Sequence[str] | None = None,
                     tier: str | None = None) -> dict[str, Any]:
        """Buffer one answer. -> {"stored": True, "id", "expires_at"} or
        {"stored": False, "reason"} (policy said no, or not a plain text answer)."""
        plan = _decision(decision)
        tenant = _tenant(tenant)
        if not plan.store:
            return {"stored": False, "reason": plan.reason or "no_store"}
        if not plan.query_text or not plan.prompt_hash:
            return {"stored": False, "reason": "no_prompt"}
        if not isinstance(completion, Mapping) or not is_storable(completion):
            return {"stored": False, "reason": "not_storable"}
        if vector is None:
            raise ApiError(400, "cache store needs the prompt's embedding vector.",
                           code="invalid_cache_request", param="vector")
        sources = _source_ids(source_ids)
        now = self.clock()
        ttl = (min(plan.ttl_s, self.settings.max_ttl_s) if plan.ttl_s
               else self.settings.ttl_for(plan.namespace))
        expires_at = now + ttl if ttl is not None else NEVER
        entry = CacheEntry(
            tenant=tenant, scope_key=plan.scope_key, prompt_hash=plan.prompt_hash,
            prompt=plan.query_text, vector=vector,  # type: ignore[arg-type]
            answer=json.dumps(completion, separators=(",", ":")),
            model=str(completion.get("model") or plan.model), requested_model=plan.model,
            namespace=plan.namespace, tier=tier or "", source_ids=sources,
            created_at=now, expires_at=expires_at)
        try:
            self.store.add([entry])
        except ValueError as exc:
            raise ApiError(400, f"cache store: {exc}", code="invalid_cache_request") from exc
        self.counts["stores"] += 1
        return {"stored": True, "id": entry.id,
                "expires_at": None if expires_at == NEVER else expires_at}

    def record_saving(self, usd: float, model: str) -> dict[str, Any]:
        if not math.isfinite(usd) or usd < 0:
            raise ApiError(400, "saving must be a finite amount >= 0", code="invalid_saving")
        self.counts["saved_usd"] += usd
        self.metrics.saved(usd, model)
        return {"saved_usd_total": self.counts["saved_usd"]}

    # ---- administration --------------------------------------------------------------

    def invalidate(self, kind: str, value: str | None = None,
                   tenant: str | None = None) -> dict[str, Any]:
        if kind not in INVALIDATION_KINDS:
            raise ApiError(422, f"Unknown invalidation kind '{kind}'. Use one of: "
                           f"{', '.join(INVALIDATION_KINDS)}.", code="invalid_kind",
                           param="kind")
        if kind != "all" and not value:
            raise ApiError(422, f"Invalidation by {kind} needs a value.",
                           code="missing_value", param="value")
        deleted = self.store.invalidate(kind, value, tenant=tenant)
        self.metrics.entries(self.store.count())
        return {"deleted": deleted, "kind": kind, "value": value, "tenant": tenant}

    def flush(self, *, hits: bool = True) -> dict[str, Any]:
        return {"inserted": self.store.flush(hits=hits)}

    def maintain(self, *, force_compaction: bool = False) -> dict[str, Any]:
        """Expire, evict beyond the size cap, compact and index. Runs in the background."""
        expired = self.store.expire(self.clock())
        target = max(1, int(self.settings.max_entries * self.settings.evict_to_fraction))
        evicted = self.store.evict(self.settings.max_entries, target)
        if expired:
            self.metrics.evicted(expired, "ttl")
        if evicted:
            self.metrics.evicted(evicted, "size")
        optimized = self.store.optimize(force=force_compaction)
        entries = self.store.count()
        self.metrics.entries(entries)
        return {"expired": expired, "evicted": evicted, "entries": entries, **optimized}

    def stats(self) -> dict[str, Any]:
        return {**self.store.stats(), **self.counts,
                "threshold": self.settings.similarity_threshold,
                "guard": self.settings.guard}

    def close(self) -> None:
        self.store.close()


def _decision(value: Mapping[str, Any]) -> CacheDecision:
    try:
        return CacheDecision.from_dict(value)
    except (TypeError, AttributeError) as exc:
        raise ApiError(400, f"invalid cache decision: {exc}", code="invalid_cache_request",
                       param="decision") from exc


def _tenant(tenant: Any) -> str:
    if not isinstance(tenant, str) or not tenant:
        raise ApiError(400, "cache calls need a tenant id", code="invalid_cache_request",
                       param="tenant")
    return tenant


def _source_ids(values: Sequence[str] | None) -> list[str]:
    """Validated source ids; "doc:<id>@<version>" is also stored as "doc:<id>", so one
    invalidation can drop every version of a document."""
    sources = list(values or [])
    if len(sources) > MAX_SOURCE_IDS or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_ID_CHARS for s in sources):
        raise ApiError(400, f"source_ids: at most {MAX_SOURCE_IDS} strings of 1-"
                       f"{MAX_ID_CHARS} characters", code="invalid_cache_request",
                       param="source_ids")
    expanded: list[str] = []
    for source in sources:
        for item in (source, source.rsplit("@", 1)[0]):
            if item and item not in expanded:
                expanded.append(item)
    return expanded
