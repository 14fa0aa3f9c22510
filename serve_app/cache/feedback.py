"""Feedback on served cache hits: which hit a request got, what was reported wrong, and
the threshold rule that learns from it.

- Every hit served to a request is remembered by the request's server id
  (`x-llmstack-request-id`) for `cache.feedback.served_retention_s`: tenant, entry,
  namespace, similarity, verifier score, the query and the cached prompt. So a client can
  report a wrong answer by the id of the response it got.
- A report (CacheService.mark_wrong) removes the entry and records a *negative*: the pair
  (query, cached prompt) with its similarity. Negatives are durable (written before the
  report is answered) and reloaded when the replica starts. A recorded pair is never served
  again to that tenant (a new entry for the same cached prompt is skipped for that query).
- `learned_threshold`: once a (tenant, namespace) holds `min_count` distinct confirmed-wrong
  *semantic* hits, its threshold rises to `margin` above the highest similarity that
  `min_count` of them reached (the min_count-th highest), capped at `max_threshold`. So a
  single report moves nothing, every reported level is stepped over only once it was
  reported `min_count` times, and the cache never becomes exact-only through feedback.
  Exact hits reported wrong remove their entry but move no threshold (the answer was bad,
  not the match). The learned value is a floor: a namespace's configured or a request's
  threshold still applies when higher. Only the tenant's own reports move its threshold;
  the admin API resets them.

Storage: two LanceDB tables beside the cache table (`<table>_served`, `<table>_feedback`).
Served hits are buffered and written in batches with the cache's background flush (one
write per batch, like cache inserts); the newest ones are also kept in memory.
"""
from __future__ import annotations

import logging
import math
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import lancedb
import pyarrow as pa
from lancedb.expr import col, lit
from lancedb.index import BTree

from serve_app.cache.config import CacheFeedbackSettings

logger = logging.getLogger(__name__)

RECENT_SERVED = 10_000  # newest served hits kept in memory as well
SCALAR_INDEX_ROWS = 1_000
COMPACT_AFTER_FRAGMENTS = 16
THRESHOLD_DECIMALS = 3


def learned_threshold(similarities: Iterable[float], rule: CacheFeedbackSettings
                      ) -> float | None:
    """The feedback floor for one (tenant, namespace) from the similarities of its
    distinct confirmed-wrong semantic hits; None while there are fewer than min_count."""
    ranked = sorted((float(s) for s in similarities), reverse=True)
    if len(ranked) < rule.min_count:
        return None
    level = ranked[rule.min_count - 1] + rule.margin
    return min(rule.max_threshold, _round_up(level))


def _round_up(value: float) -> float:
    scale = 10 ** THRESHOLD_DECIMALS
    return math.ceil(round(value * scale, 6)) / scale


@dataclass(frozen=True)
class ServedHit:
    request_id: str
    tenant: str
    entry_id: str
    namespace: str
    match: str  # "exact" | "semantic"
    similarity: float
    query: str
    query_hash: str
    cached_prompt: str
    cached_hash: str
    served_at: float
    verifier_score: float | None = None


@dataclass(frozen=True)
class Negative:
    """A hit confirmed wrong: never serve `cached_hash`'s entries for `query_hash` again."""

    tenant: str
    namespace: str
    entry_id: str
    match: str  # "exact" | "semantic" | "unserved" (reported by entry id, never served)
    query: str
    query_hash: str
    cached_prompt: str
    cached_hash: str
    marked_by: str
    created_at: float
    request_id: str = ""
    similarity: float | None = None
    verifier_score: float | None = None
    reason: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def pair(self) -> tuple[str, str] | None:
        return (self.query_hash, self.cached_hash) if self.query_hash else None


SERVED_SCHEMA = pa.schema([
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("tenant", pa.string()),
    pa.field("entry_id", pa.string()),
    pa.field("namespace", pa.string()),
    pa.field("match", pa.string()),
    pa.field("similarity", pa.float64()),
    pa.field("query", pa.string()),
    pa.field("query_hash", pa.string()),
    pa.field("cached_prompt", pa.string()),
    pa.field("cached_hash", pa.string()),
    pa.field("served_at", pa.float64()),
    pa.field("verifier_score", pa.float64()),
])
NEGATIVE_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("tenant", pa.string()),
    pa.field("namespace", pa.string()),
    pa.field("entry_id", pa.string()),
    pa.field("match", pa.string()),
    pa.field("query", pa.string()),
    pa.field("query_hash", pa.string()),
    pa.field("cached_prompt", pa.string()),
    pa.field("cached_hash", pa.string()),
    pa.field("marked_by", pa.string()),
    pa.field("created_at", pa.float64()),
    pa.field("request_id", pa.string()),
    pa.field("similarity", pa.float64()),
    pa.field("verifier_score", pa.float64()),
    pa.field("reason", pa.string()),
])


class FeedbackStore:
    """Served hits and negatives of one cache (same LanceDB URI), and the learned floors."""

    def __init__(self, uri: str, table_name: str, rule: CacheFeedbackSettings) -> None:
        self.rule = rule
        self._db = lancedb.connect(uri)
        self._served = self._db.create_table(f"{table_name}_served", schema=SERVED_SCHEMA,
                                             exist_ok=True)
        self._negatives = self._db.create_table(f"{table_name}_feedback",
                                                schema=NEGATIVE_SCHEMA, exist_ok=True)
        self._lock = threading.Lock()  # memory state; LanceDB writes are serialised too
        self._write_lock = threading.Lock()
        self._pending: list[ServedHit] = []
        self._recent: OrderedDict[str, ServedHit] = OrderedDict()
        self._by_tenant: dict[str, list[Negative]] = {}
        self._pairs: set[tuple[str, str, str]] = set()  # (tenant, query_hash, cached_hash)
        self._floors: dict[tuple[str, str], float] = {}
        rows = self._negatives.to_arrow().to_pylist()
        self._install([_negative_from_row(row) for row in rows])

    # ---- served hits -------------------------------------------------------------------

    def record_served(self, hit: ServedHit) -> None:
        with self._lock:
            self._pending.append(hit)
            self._recent[hit.request_id] = hit
            self._recent.move_to_end(hit.request_id)
            while len(self._recent) > RECENT_SERVED:
                self._recent.popitem(last=False)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self) -> int:
        """Write buffered served hits (one LanceDB write)."""
        with self._write_lock:
            with self._lock:
                batch, self._pending = self._pending, []
            if not batch:
                return 0
            try:
                self._served.add(pa.Table.from_pylist([asdict(h) for h in batch],
                                                      schema=SERVED_SCHEMA))
            except Exception:
                with self._lock:
                    self._pending = batch + self._pending
                raise
            return len(batch)

    def served(self, request_id: str) -> ServedHit | None:
        with self._lock:
            hit = self._recent.get(request_id)
        if hit is not None:
            return hit
        rows = (self._served.search().where(col("request_id") == lit(request_id))
                .limit(1).to_list())
        return _served_from_row(rows[0]) if rows else None

    def last_served_entry(self, entry_id: str) -> ServedHit | None:
        """The newest hit served from an entry (by entry id, for reports by entry id)."""
        with self._lock:
            for hit in reversed(self._recent.values()):
                if hit.entry_id == entry_id:
                    return hit
        rows = (self._served.search().where(col("entry_id") == lit(entry_id))
                .limit(1000).to_list())
        if not rows:
            return None
        return _served_from_row(max(rows, key=lambda row: row["served_at"]))

    def prune(self, older_than: float) -> int:
        """Forget served hits older than `older_than` (epoch s); compact and index."""
        with self._write_lock:
            removed = int(self._served.delete(
                (col("served_at") < lit(float(older_than))).to_sql()).num_deleted_rows)
            stats = self._served.stats()
            if int(stats["fragment_stats"]["num_fragments"]) >= COMPACT_AFTER_FRAGMENTS:
                self._served.optimize(cleanup_older_than=timedelta(minutes=5))
            indexed = {c for index in self._served.list_indices() for c in index.columns}
            if int(stats["num_rows"]) >= SCALAR_INDEX_ROWS and not (
                    {"request_id", "entry_id"} <= indexed):
                for column in ("request_id", "entry_id"):
                    self._served.create_index(column, config=BTree(), replace=True)
        with self._lock:
            for request_id in [r for r, h in self._recent.items() if h.served_at < older_than]:
                del self._recent[request_id]
        return removed

    # ---- negatives ---------------------------------------------------------------------

    def add_negative(self, negative: Negative) -> None:
        """Durable first (one LanceDB write), then in memory."""
        with self._write_lock:
            self._negatives.add(pa.Table.from_pylist([asdict(negative)],
                                                     schema=NEGATIVE_SCHEMA))
        with self._lock:
            self._install([negative], reset=False)

    def negative_for_request(self, tenant: str, request_id: str) -> Negative | None:
        with self._lock:
            return next((n for n in self._by_tenant.get(tenant, ())
                         if request_id and n.request_id == request_id), None)

    def negative_for_entry(self, tenant: str, entry_id: str) -> Negative | None:
        with self._lock:
            return next((n for n in self._by_tenant.get(tenant, ()) if n.entry_id == entry_id),
                        None)

    def is_negative(self, tenant: str, query_hash: str, cached_hash: str) -> bool:
        return (tenant, query_hash, cached_hash) in self._pairs

    def has_negatives(self, tenant: str) -> bool:
        return tenant in self._by_tenant

    def floor(self, tenant: str, namespace: str) -> float | None:
        return self._floors.get((tenant, namespace))

    def confirmed_wrong(self, tenant: str, namespace: str) -> int:
        with self._lock:
            return len(_semantic_pairs(self._by_tenant.get(tenant, ()), namespace))

    def summary(self, tenant: str) -> list[dict[str, Any]]:
        with self._lock:
            negatives = list(self._by_tenant.get(tenant, ()))
        out = []
        for namespace in sorted({n.namespace for n in negatives}):
            members = [n for n in negatives if n.namespace == namespace]
            out.append({"namespace": namespace, "negatives": len(members),
                        "confirmed_wrong": len(_semantic_pairs(members, namespace)),
                        "learned_threshold": self._floors.get((tenant, namespace)),
                        "last_reported_at": max(n.created_at for n in members)})
        return out

    def reset(self, tenant: str, namespace: str | None = None) -> int:
        """Drop a tenant's negatives (of one namespace, or all): its floors go too."""
        predicate = col("tenant") == lit(tenant)
        if namespace is not None:
            predicate = predicate & (col("namespace") == lit(namespace))
        with self._write_lock:
            deleted = int(self._negatives.delete(predicate.to_sql()).num_deleted_rows)
            rows = self._negatives.to_arrow().to_pylist()
        with self._lock:
            self._install([_negative_from_row(row) for row in rows], reset=True)
        return deleted

    def _install(self, negatives: Sequence[Negative], reset: bool = True) -> None:
        """Add negatives to the memory state and recompute the touched floors."""
        if reset:
            self._by_tenant, self._pairs, self._floors = {}, set(), {}
        touched: set[tuple[str, str]] = set()
        for negative in negatives:
            self._by_tenant.setdefault(negative.tenant, []).append(negative)
            if negative.pair is not None:
                self._pairs.add((negative.tenant, *negative.pair))
            touched.add((negative.tenant, negative.namespace))
        for tenant, namespace in touched:
            similarities = _semantic_pairs(self._by_tenant[tenant], namespace).values()
            floor = learned_threshold(similarities, self.rule)
            if floor is None:
                self._floors.pop((tenant, namespace), None)
            else:
                self._floors[(tenant, namespace)] = floor


def _semantic_pairs(negatives: Iterable[Negative], namespace: str
                    ) -> dict[tuple[str, str], float]:
    """Distinct confirmed-wrong semantic pairs of a namespace -> their similarity."""
    pairs: dict[tuple[str, str], float] = {}
    for negative in negatives:
        if (negative.namespace != namespace or negative.match != "semantic"
                or negative.pair is None or negative.similarity is None):
            continue
        pairs[negative.pair] = max(pairs.get(negative.pair, 0.0), negative.similarity)
    return pairs


def _served_from_row(row: dict[str, Any]) -> ServedHit:
    return ServedHit(**{name: row[name] for name in ServedHit.__dataclass_fields__})


def _negative_from_row(row: dict[str, Any]) -> Negative:
    values = {name: row[name] for name in Negative.__dataclass_fields__}
    for text in ("request_id", "reason", "query", "query_hash"):
        values[text] = values[text] or ""
    return Negative(**values)
