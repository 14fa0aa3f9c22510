"""CacheService: settings + policy results + store + guard + verifier + feedback, with
plain-dict inputs and outputs (what crosses a deployment handle). No Ray here; the
SemanticCache deployment adds the background flush/maintenance loop and Ray metrics.

Which similarity a semantic candidate needs (`floor`):
- guard only (cache.verifier off): the request's threshold, else the namespace's, else
  similarity_threshold;
- with the verifier: the verifier's min_similarity, raised by a request's or a configured
  namespace threshold when higher (similarity_threshold is the guard-only calibration);
- either way, raised to the tenant's learned feedback floor for the namespace.

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
from serve_app.cache.feedback import FeedbackStore, Negative, ServedHit
from serve_app.cache.guard import PairGuard
from serve_app.cache.namespace_stats import NamespaceStats
from serve_app.cache.policy import CacheDecision, prompt_hash
from serve_app.cache.replay import is_storable
from serve_app.cache.store import INVALIDATION_KINDS, NEVER, CacheEntry, CacheStore
from serve_app.cache.verifier import VerifierGate, VerifierModel
from serve_app.errors import ApiError

MAX_SOURCE_IDS = 64
MAX_ID_CHARS = 512  # RAG source ids reach ~475 characters
MAX_REASON_CHARS = 500


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
                 clock: Callable[[], float] = time.time,
                 data_dir: Path | str | None = None) -> None:
        """data_dir: where a relative `cache.verifier_model` is looked for first."""
        self.settings = settings
        self.metrics: CacheMetrics = metrics or NullMetrics()
        self.clock = clock
        self.guard = (PairGuard(short_text_tokens=settings.guard_short_text_tokens)
                      if settings.guard else None)
        self.verifier: VerifierGate | None = None
        if settings.uses_verifier:
            model = VerifierModel.load(settings.verifier_path(data_dir))
            cutoff = model.cutoff if settings.verifier_cutoff is None else settings.verifier_cutoff
            self.verifier = VerifierGate(model, cutoff, settings.verifier_candidates)
        self.store = CacheStore(
            uri, table_name=settings.table_name, dim=settings.embedding_dim,
            batch_size=settings.insert_batch_size,
            search_candidates=settings.search_candidates,
            index_threshold=settings.index_build_threshold, index_type=settings.index_type,
            compact_after_fragments=settings.compact_after_fragments,
            cleanup_older_than_s=settings.cleanup_older_than_s,
            memory_index=settings.memory_index)
        self.feedback = FeedbackStore(self.store.uri, settings.table_name, settings.feedback)
        self.counts = {"hits": 0, "misses": 0, "stores": 0, "saved_usd": 0.0,
                       "reported_wrong": 0}
        self.namespace_stats = NamespaceStats()

    # ---- the request path ------------------------------------------------------------

    def lookup(self, tenant: str, decision: Mapping[str, Any],
               vector: Sequence[float] | None, exact_only: bool = False,
               request_id: str | None = None) -> dict[str, Any]:
        """-> {"hit": True, "completion", "similarity", "match", ...} or {"hit": False, ...}
        `exact_only`: the normalised-prompt hash only, asked before the query is embedded;
        its miss is not counted (the full lookup that follows counts it). `request_id`:
        the server's id of the request; a hit is remembered under it (feedback)."""
        started = time.perf_counter()
        plan = _decision(decision)
        tenant = _tenant(tenant)
        threshold = self.floor(tenant, plan)
        if not plan.lookup:
            self.namespace_stats.record(tenant, plan.namespace, hit=False, similarity=None,
                                        skipped=True)
            return self._miss(plan, f"skipped:{plan.reason}", None, threshold, started)
        blocked = None
        if plan.prompt_hash and self.feedback.has_negatives(tenant):
            def blocked(row: Mapping[str, Any]) -> bool:
                return self.feedback.is_negative(tenant, plan.prompt_hash, row["prompt_hash"])
        try:
            outcome = self.store.lookup(
                tenant=tenant, scope_key=plan.scope_key, prompt_hash=plan.prompt_hash,
                vector=vector, threshold=threshold, now=self.clock(),
                query_text=plan.query_text, guard=self.guard.check if self.guard else None,
                semantic=plan.semantic and not exact_only, verifier=self.verifier,
                blocked=blocked)
        except ValueError as exc:
            raise ApiError(400, f"cache lookup: {exc}", code="invalid_cache_request") from exc
        if outcome.hit is None and exact_only:
            return {"hit": False, "reason": "no_exact_match", "threshold": threshold,
                    "similarity": None, "probe": True}
        if outcome.hit is None:
            self.namespace_stats.record(tenant, plan.namespace, hit=False,
                                        similarity=outcome.best_similarity)
            return self._miss(plan, outcome.rejected or "miss", outcome.best_similarity,
                              threshold, started, outcome.verifier_score)
        hit = outcome.hit
        now = self.clock()
        self.store.record_hit(hit.entry_id, now)
        if request_id:
            self.feedback.record_served(ServedHit(
                request_id=str(request_id)[:MAX_ID_CHARS], tenant=tenant,
                entry_id=hit.entry_id, namespace=hit.namespace, match=hit.match,
                similarity=float(hit.similarity), query=plan.query_text,
                query_hash=plan.prompt_hash, cached_prompt=hit.prompt,
                cached_hash=hit.prompt_hash, served_at=now,
                verifier_score=hit.verifier_score))
        self.counts["hits"] += 1
        self.namespace_stats.record(tenant, plan.namespace, hit=True,
                                    similarity=float(hit.similarity))
        self.metrics.hit(hit.match, hit.similarity, self._metric_namespace(plan.namespace))
        elapsed = time.perf_counter() - started
        self.metrics.lookup_seconds(elapsed)
        completion = hit.completion()
        return {"hit": True, "match": hit.match, "similarity": round(hit.similarity, 4),
                "threshold": threshold, "entry_id": hit.entry_id, "completion": completion,
                "usage": completion.get("usage"), "model": hit.model, "tier": hit.tier,
                "namespace": hit.namespace, "source_ids": list(hit.source_ids),
                "created_at": hit.created_at, "cached_prompt": hit.prompt,
                "verifier_score": _rounded(hit.verifier_score),
                "lookup_ms": round(elapsed * 1000, 3)}

    def floor(self, tenant: str, plan: CacheDecision) -> float:
        """The similarity a semantic candidate needs (see the module docstring)."""
        if self.verifier is None:
            base = plan.threshold or self.settings.threshold_for(plan.namespace)
        else:
            explicit = plan.threshold or self.settings.namespace_thresholds.get(plan.namespace)
            base = max(self.verifier.min_similarity, explicit or 0.0)
        learned = self.feedback.floor(tenant, plan.namespace)
        return base if learned is None else max(base, learned)

    def _metric_namespace(self, namespace: str) -> str:
        """Namespaces named in the settings, else "other": clients choose namespaces, and
        metric tags must stay few."""
        known = (namespace == DEFAULT_NAMESPACE or namespace in self.settings.namespace_thresholds
                 or namespace in self.settings.namespace_ttl_s)
        return namespace if known else "other"

    def _miss(self, plan: CacheDecision, reason: str, similarity: float | None,
              threshold: float, started: float,
              verifier_score: float | None = None) -> dict[str, Any]:
        self.counts["misses"] += 1
        self.metrics.miss(reason, self._metric_namespace(plan.namespace))
        elapsed = time.perf_counter() - started
        self.metrics.lookup_seconds(elapsed)
        return {"hit": False, "reason": reason, "threshold": threshold,
                "similarity": None if similarity is None else round(similarity, 4),
                "verifier_score": _rounded(verifier_score),
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
        return {"inserted": self.store.flush(hits=hits),
                "served_logged": self.feedback.flush()}

    @property
    def pending_writes(self) -> int:
        """Buffered inserts and served-hit records (hit counts wait for maintenance)."""
        return self.store.pending_inserts + self.feedback.pending

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
        self.feedback.flush()
        forgotten = self.feedback.prune(
            self.clock() - self.settings.feedback.served_retention_s)
        return {"expired": expired, "evicted": evicted, "entries": entries,
                "served_forgotten": forgotten, **optimized}

    def stats(self) -> dict[str, Any]:
        return {**self.store.stats(), **self.counts,
                "threshold": self.settings.similarity_threshold,
                "guard": self.settings.guard,
                "verifier": None if self.verifier is None else {
                    "model_version": self.verifier.model.version,
                    "min_similarity": self.verifier.min_similarity,
                    "cutoff": self.verifier.cutoff, "candidates": self.verifier.candidates}}

    def namespaces(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Per (tenant, namespace): entries stored now, and this replica's lookups, hits,
        hit rate and similarity histograms (hits and misses) since it started."""
        counts = self.store.namespace_counts(tenant)
        seen = self.namespace_stats.snapshot(tenant)
        rows = {(r["tenant"], r["namespace"]): {**r, "entries": 0} for r in seen}
        for (t, ns), entries in counts.items():
            rows.setdefault((t, ns), {"tenant": t, "namespace": ns, "lookups": 0, "hits": 0,
                                      "skipped": 0, "hit_rate": None, "similarity": None})
            rows[(t, ns)]["entries"] = entries
        return [rows[k] for k in sorted(rows)]

    def entries(self, tenant: str | None = None, namespace: str | None = None,
                limit: int = 100) -> list[dict[str, Any]]:
        return self.store.entries(tenant=tenant, namespace=namespace, limit=limit)

    # ---- feedback --------------------------------------------------------------------

    def mark_wrong(self, principal: Mapping[str, Any], request_id: str | None = None,
                   entry_id: str | None = None, reason: str | None = None) -> dict[str, Any]:
        """A served answer is wrong: remove its entry, record the pair as a negative and
        recompute the namespace's feedback floor. By the request's server id (the hit it
        got) or by entry id. A tenant key reports its own tenant's hits only (403
        otherwise); the admin key any. 404 when nothing was served under the id."""
        caller_tenant, admin = _caller(principal)
        if (request_id is None) == (entry_id is None):
            raise ApiError(422, "Give exactly one of request_id and entry_id.",
                           code="invalid_value", param="request_id")
        reason = (reason or "")[:MAX_REASON_CHARS]
        if request_id is not None:
            served = self.feedback.served(_id(request_id, "request_id"))
            if served is None:
                raise ApiError(404, f"No cached answer was served for request {request_id} "
                               "(or it is older than cache.feedback.served_retention_s).",
                               code="cache_hit_not_found", param="request_id")
            owner, entry_id = served.tenant, served.entry_id
            row = self.store.get(entry_id)
        else:
            entry_id = _id(entry_id, "entry_id")
            row = self.store.get(entry_id)
            served = self.feedback.last_served_entry(entry_id)
            if row is not None:
                owner = str(row["tenant"])
            elif served is not None:
                owner = served.tenant
            else:
                raise ApiError(404, f"No cache entry {entry_id}.", code="cache_entry_not_found",
                               param="entry_id")
        if not admin and owner != caller_tenant:
            raise ApiError(403, "This cached answer belongs to another tenant.",
                           code="not_your_cache_entry",
                           param="request_id" if request_id is not None else "entry_id")
        existing = (self.feedback.negative_for_request(owner, request_id)
                    if request_id is not None
                    else self.feedback.negative_for_entry(owner, entry_id))
        removed = self.store.invalidate("id", entry_id, tenant=owner) if row is not None else 0
        if removed:
            self.metrics.entries(self.store.count())
        if existing is not None:
            return self._feedback_answer(existing, removed, already=True)
        negative = _negative(owner, entry_id, served, row, request_id=request_id or "",
                             marked_by="admin" if admin else str(principal.get("key_id") or ""),
                             reason=reason, now=self.clock())
        self.feedback.add_negative(negative)
        self.counts["reported_wrong"] += 1
        return self._feedback_answer(negative, removed, already=False)

    def _feedback_answer(self, negative: Negative, removed: int, *,
                         already: bool) -> dict[str, Any]:
        namespace = negative.namespace
        configured = self.settings.namespace_thresholds.get(namespace)
        return {
            "object": "cache.feedback", "id": negative.id, "tenant": negative.tenant,
            "namespace": namespace, "entry_id": negative.entry_id,
            "request_id": negative.request_id or None, "match": negative.match,
            "similarity": _rounded(negative.similarity), "removed": bool(removed),
            "already_reported": already,
            "threshold": {
                "confirmed_wrong": self.feedback.confirmed_wrong(negative.tenant, namespace),
                "min_count": self.settings.feedback.min_count,
                "learned": self.feedback.floor(negative.tenant, namespace),
                "configured": configured if configured is not None else (
                    self.verifier.min_similarity if self.verifier is not None
                    else self.settings.similarity_threshold)},
        }

    def feedback_summary(self, tenant: str) -> dict[str, Any]:
        return {"object": "list", "tenant": _tenant(tenant),
                "data": self.feedback.summary(tenant)}

    def reset_feedback(self, tenant: str, namespace: str | None = None) -> dict[str, Any]:
        """Forget a tenant's reports (one namespace, or all) and the floors they set."""
        deleted = self.feedback.reset(_tenant(tenant), namespace)
        return {"deleted": deleted, "tenant": tenant, "namespace": namespace}

    def close(self) -> None:
        self.store.close()


def _negative(owner: str, entry_id: str, served: ServedHit | None,
              row: Mapping[str, Any] | None, **fields: Any) -> Negative:
    """The report as a negative: the pair from the hit that was served (by request id,
    or the entry's newest hit), else the entry alone ("unserved": no query to pair)."""
    if served is not None:
        return Negative(tenant=owner, namespace=served.namespace, entry_id=entry_id,
                        match=served.match, query=served.query, query_hash=served.query_hash,
                        cached_prompt=served.cached_prompt, cached_hash=served.cached_hash,
                        similarity=served.similarity, verifier_score=served.verifier_score,
                        created_at=fields.pop("now"), **fields)
    assert row is not None
    prompt = str(row["prompt"])
    return Negative(tenant=owner, namespace=str(row["namespace"]), entry_id=entry_id,
                    match="unserved", query="", query_hash="", cached_prompt=prompt,
                    cached_hash=str(row.get("prompt_hash") or prompt_hash(prompt)),
                    created_at=fields.pop("now"), **fields)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def _caller(principal: Mapping[str, Any]) -> tuple[str | None, bool]:
    if not isinstance(principal, Mapping):
        raise ApiError(400, "cache feedback needs the caller", code="invalid_cache_request")
    admin = bool(principal.get("admin"))
    tenant = principal.get("tenant_id")
    if not admin and not (isinstance(tenant, str) and tenant):
        raise ApiError(400, "cache feedback needs the caller's tenant",
                       code="invalid_cache_request")
    return tenant, admin


def _id(value: Any, param: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise ApiError(422, f"{param} must be a string of 1-{MAX_ID_CHARS} characters.",
                       code="invalid_value", param=param)
    return value


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
