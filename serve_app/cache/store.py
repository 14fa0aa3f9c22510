"""The cache table: LanceDB rows of (tenant, scope, prompt, vector, answer, lifetimes).

One `CacheStore` owns one table in one process (the SemanticCache replica). Writes are
buffered and written in batches, because every LanceDB write makes a new data fragment
and searching many small fragments is slow; `optimize()` compacts the fragments and,
once the table is large enough, builds the ANN index (HNSW over scalar-quantised vectors,
or IVF_FLAT) and B-tree indexes on the filter columns. Entries still in the write buffer
are searched in memory, so an answer is findable as soon as it is stored. With
`memory_index` (the default) every lookup reads an in-memory mirror of the table
(memory_index.py) instead of querying LanceDB; the table stays the durable copy.

Lookups filter on tenant, scope key and expiry *before* the vector search (prefilter),
so one tenant's entries are never candidates for another's request. Filters are built
with `lancedb.expr` (`col(...) == lit(value)`), which quotes values: tenant ids and other
user-supplied strings never reach the SQL text unescaped.

Thread-safe: lookups may run concurrently with one another and with writes; writes
(flush, delete, optimize) are serialised.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.expr import Expr, col, lit
from lancedb.index import BTree, HnswSq, IvfFlat

from serve_app.cache.memory_index import MemoryIndex
from serve_app.cache.verifier import VerifierGate

logger = logging.getLogger(__name__)

NEVER = 253_402_300_799.0  # 9999-12-31T23:59:59Z: expires_at of entries without a TTL
INVALIDATION_KINDS = ("tenant", "model", "id", "source", "namespace", "all")
_FILTER_COLUMNS = ("tenant", "scope_key", "prompt_hash", "id")
SCALAR_INDEX_ROWS = 1_000  # B-tree indexes on the filter columns from this many rows
_DELETE_CHUNK = 512


def cache_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), dim)),
        pa.field("prompt", pa.string()),
        pa.field("prompt_hash", pa.string()),
        pa.field("answer", pa.string()),  # JSON of the OpenAI chat.completion body
        pa.field("model", pa.string()),  # the model that answered
        pa.field("requested_model", pa.string()),  # what the client asked for ("auto")
        pa.field("tier", pa.string()),
        pa.field("tenant", pa.string()),
        pa.field("scope_key", pa.string()),
        pa.field("namespace", pa.string()),
        pa.field("created_at", pa.float64()),
        pa.field("expires_at", pa.float64()),
        pa.field("last_hit_at", pa.float64()),
        pa.field("hit_count", pa.int64()),
        pa.field("source_ids", pa.list_(pa.string())),  # "doc:<id>@<version>"
    ])


_LISTED_COLUMNS = ["id", "prompt", "model", "requested_model", "tier", "tenant", "namespace",
                   "created_at", "expires_at", "last_hit_at", "hit_count", "source_ids"]
LISTED_PROMPT_CHARS = 300
LIST_SCAN_ROWS = 100_000  # the admin listing's bound on rows read per call
_RESULT_COLUMNS = ["id", "prompt", "prompt_hash", "answer", "model", "requested_model", "tier",
                   "namespace", "created_at", "expires_at", "hit_count", "source_ids",
                   "tenant"]


@dataclass
class CacheEntry:
    tenant: str
    scope_key: str
    prompt_hash: str
    prompt: str
    vector: np.ndarray
    answer: str
    model: str
    created_at: float
    expires_at: float = NEVER
    requested_model: str = ""
    namespace: str = "default"
    tier: str = ""
    source_ids: list[str] = field(default_factory=list)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    last_hit_at: float | None = None
    hit_count: int = 0

    def row(self) -> dict[str, Any]:
        return {"id": self.id, "vector": self.vector, "prompt": self.prompt,
                "prompt_hash": self.prompt_hash, "answer": self.answer, "model": self.model,
                "requested_model": self.requested_model, "tier": self.tier,
                "tenant": self.tenant, "scope_key": self.scope_key,
                "namespace": self.namespace, "created_at": self.created_at,
                "expires_at": self.expires_at,
                "last_hit_at": self.created_at if self.last_hit_at is None else self.last_hit_at,
                "hit_count": self.hit_count, "source_ids": list(self.source_ids)}


@dataclass(frozen=True)
class CacheHit:
    entry_id: str
    similarity: float
    match: str  # "exact" | "semantic"
    prompt: str
    answer: str
    model: str
    tier: str
    namespace: str
    created_at: float
    expires_at: float
    hit_count: int
    source_ids: tuple[str, ...]
    prompt_hash: str = ""
    verifier_score: float | None = None  # the verifier's score, when it decided

    def completion(self) -> dict[str, Any]:
        return json.loads(self.answer)


@dataclass(frozen=True)
class LookupOutcome:
    hit: CacheHit | None
    best_similarity: float | None = None  # of the nearest candidate, hit or not
    rejected: str | None = None  # miss reason: "empty", "below_threshold",
    # "guard:<check>", "verifier", "feedback"
    candidates: int = 0
    verifier_score: float | None = None  # the best score the verifier gave


GuardFn = Callable[[str, str], Any]  # (query, cached prompt) -> object with .ok, .reason
BlockedFn = Callable[[dict[str, Any]], bool]  # a candidate row reported wrong for this query



class CacheStore:
    def __init__(self, uri: str | Path, *, table_name: str = "entries", dim: int = 384,
                 batch_size: int = 64, search_candidates: int = 8,
                 index_threshold: int = 10_000, index_type: str = "IVF_FLAT",
                 compact_after_fragments: int = 16,
                 cleanup_older_than_s: float = 300.0, memory_index: bool = True) -> None:
        if isinstance(uri, Path):
            uri.mkdir(parents=True, exist_ok=True)
        self.uri = str(uri)
        self.table_name = table_name
        self.dim = dim
        self.batch_size = batch_size
        self.search_candidates = search_candidates
        self.index_threshold = index_threshold
        self.index_type = index_type
        self.compact_after_fragments = compact_after_fragments
        self.cleanup_older_than = timedelta(seconds=cleanup_older_than_s)
        self.schema = cache_schema(dim)
        self.counters: Counter[str] = Counter()
        self._pending: list[CacheEntry] = []
        self._flushing: list[CacheEntry] = []
        self._hits: dict[str, tuple[int, float]] = {}
        self._buffer_lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._db = lancedb.connect(self.uri)
        self._table = self._open_table()
        # Lookups read an in-memory mirror of the table (see memory_index.py).
        self._memory: MemoryIndex | None = None
        if memory_index:
            self._memory = MemoryIndex()
            self._memory.add(self._table.to_arrow().to_pylist())

    # ---- opening -------------------------------------------------------------------

    def _open_table(self) -> Any:
        try:
            return self._db.create_table(self.table_name, schema=self.schema, exist_ok=True)
        except ValueError as exc:  # an older layout (another dim, other columns)
            logger.warning("cache table %s has another schema (%s); recreating it empty",
                           self.table_name, exc)
            self._db.drop_table(self.table_name)
            return self._db.create_table(self.table_name, schema=self.schema)

    # ---- lookups -------------------------------------------------------------------

    def lookup(self, *, tenant: str, scope_key: str, prompt_hash: str,
               vector: Sequence[float] | np.ndarray | None, threshold: float, now: float,
               query_text: str = "", guard: GuardFn | None = None,
               semantic: bool = True, verifier: VerifierGate | None = None,
               blocked: BlockedFn | None = None) -> LookupOutcome:
        """Exact normalised-prompt match first, then the nearest entries by cosine.

        Only live entries (expires_at > now) of this tenant and scope are candidates. A
        semantic candidate must reach `threshold`, not be `blocked` (reported wrong for
        this query) and pass `guard(query_text, prompt)`; with a `verifier`, the first
        few such candidates are scored and the best is served if its score is enough.
        """
        match = _Matcher(threshold, query_text, guard, verifier, blocked)
        if self._memory is not None:
            return self._lookup_in_memory(tenant, scope_key, prompt_hash, vector, now,
                                          semantic, match)
        scope = ((col("tenant") == lit(tenant)) & (col("scope_key") == lit(scope_key))
                 & (col("expires_at") > lit(float(now))))
        buffered = self._buffered(tenant, scope_key, now)
        if prompt_hash:
            exact = next((e for e in buffered if e.prompt_hash == prompt_hash), None)
            if exact is not None:
                return LookupOutcome(_hit_from_row(exact.row(), 1.0, "exact"), 1.0, None, 1)
            rows = (self._table.search().where(scope & (col("prompt_hash") == lit(prompt_hash)))
                    .select(_RESULT_COLUMNS).limit(1).to_list())
            if rows:
                return LookupOutcome(_hit_from_row(rows[0], 1.0, "exact"), 1.0, None, 1)
        if not semantic or vector is None:
            return LookupOutcome(None, None, "no_exact_match", 0)

        query = self._unit(vector)
        rows = (self._table.search(query, vector_column_name="vector").distance_type("cosine")
                .where(scope, prefilter=True).select([*_RESULT_COLUMNS, "vector", "_distance"])
                .limit(self.search_candidates).to_list())
        scored: dict[str, tuple[float, dict[str, Any]]] = {}
        for row in rows:
            similarity = float(np.dot(query, np.asarray(row["vector"], dtype=np.float32)))
            scored[row["id"]] = (similarity, row)
        for entry in buffered:
            scored[entry.id] = (float(np.dot(query, entry.vector)), entry.row())
        ranked = sorted(scored.values(), key=lambda item: -item[0])
        return match.best(ranked)

    def _lookup_in_memory(self, tenant: str, scope_key: str, prompt_hash: str,
                          vector: Sequence[float] | np.ndarray | None, now: float,
                          semantic: bool, match: "_Matcher") -> LookupOutcome:
        assert self._memory is not None
        if prompt_hash:
            row = self._memory.exact(tenant, scope_key, prompt_hash, now)
            if row is not None:
                return LookupOutcome(_hit_from_row(row, 1.0, "exact"), 1.0, None, 1)
        if not semantic or vector is None:
            return LookupOutcome(None, None, "no_exact_match", 0)
        ranked = self._memory.nearest(tenant, scope_key, self._unit(vector), now,
                                      self.search_candidates)
        return match.best(ranked)

    def get(self, entry_id: str) -> dict[str, Any] | None:
        """One entry's row without its vector (live or expired), None when it is gone."""
        if self._memory is not None:  # the mirror holds every row, buffered ones too
            return self._memory.get(entry_id)
        with self._buffer_lock:
            buffered = [e for e in (*self._flushing, *self._pending) if e.id == entry_id]
        if buffered:
            return {k: v for k, v in buffered[0].row().items() if k != "vector"}
        rows = (self._table.search().where(col("id") == lit(entry_id))
                .select([*_RESULT_COLUMNS, "scope_key"]).limit(1).to_list())
        return rows[0] if rows else None

    def _buffered(self, tenant: str, scope_key: str, now: float) -> list[CacheEntry]:
        with self._buffer_lock:
            entries = [*self._flushing, *self._pending]
        return [e for e in entries
                if e.tenant == tenant and e.scope_key == scope_key and e.expires_at > now]

    def _unit(self, vector: Sequence[float] | np.ndarray) -> np.ndarray:
        array = np.asarray(vector, dtype=np.float32).reshape(-1)
        if array.shape[0] != self.dim:
            raise ValueError(f"vector has {array.shape[0]} dimensions, the cache expects {self.dim}")
        norm = float(np.linalg.norm(array))
        if not math.isfinite(norm) or norm == 0:
            raise ValueError("vector must be finite and non-zero")
        return array / norm

    # ---- writes ----------------------------------------------------------------------

    def add(self, entries: Iterable[CacheEntry]) -> int:
        """Buffer entries; writes a batch when the buffer is full. Returns rows written."""
        prepared = []
        for entry in entries:
            entry.vector = self._unit(entry.vector)
            prepared.append(entry)
        if self._memory is not None:  # findable at once, before the batch is written
            self._memory.add(entry.row() for entry in prepared)
        with self._buffer_lock:
            self._pending.extend(prepared)
            full = len(self._pending) >= self.batch_size
        # Never wait behind a long write (an index build): the next flush takes them.
        if full and self._write_lock.acquire(blocking=False):
            try:
                return self.flush(hits=False)
            finally:
                self._write_lock.release()
        return 0

    def record_hit(self, entry_id: str, now: float) -> None:
        """Count a hit; written by the next full flush (maintenance, eviction, close): one
        write for many hits."""
        if self._memory is not None:
            self._memory.record_hit(entry_id, now)
        with self._buffer_lock:
            for entry in self._pending:
                if entry.id == entry_id:
                    entry.hit_count += 1
                    entry.last_hit_at = now
                    return
            count, _ = self._hits.get(entry_id, (0, now))
            self._hits[entry_id] = (count + 1, now)

    @property
    def pending(self) -> int:
        with self._buffer_lock:
            return len(self._pending) + len(self._hits)

    @property
    def pending_inserts(self) -> int:
        with self._buffer_lock:
            return len(self._pending)

    def flush(self, *, hits: bool = True) -> int:
        """Write buffered inserts (one LanceDB write) and, with `hits`, the hit counts.
        Returns rows inserted. Hit counts only order eviction (the mirror has them live),
        and writing them is a LanceDB query plus a merge: the frequent background flush
        leaves them to maintenance."""
        with self._write_lock:
            with self._buffer_lock:
                batch, self._pending = self._pending, []
                self._flushing = batch
            try:
                if batch:
                    self._table.add(pa.Table.from_pylist([e.row() for e in batch],
                                                         schema=self.schema))
                    self.counters["inserted"] += len(batch)
                    self.counters["insert_writes"] += 1
            except Exception:
                with self._buffer_lock:
                    self._pending = batch + self._pending
                raise
            finally:
                with self._buffer_lock:
                    self._flushing = []
            if hits:
                self._flush_hits()
        return len(batch)

    def _flush_hits(self) -> None:
        with self._buffer_lock:
            hits, self._hits = self._hits, {}
        if not hits:
            return
        try:
            current = (self._table.search().where(col("id").isin(list(hits)))
                       .select(["id", "hit_count"]).limit(len(hits)).to_list())
            if not current:
                return
            update = pa.table({
                "id": [row["id"] for row in current],
                "hit_count": pa.array([int(row["hit_count"]) + hits[row["id"]][0]
                                       for row in current], pa.int64()),
                "last_hit_at": pa.array([hits[row["id"]][1] for row in current], pa.float64()),
            })
            self._table.merge_insert("id").when_matched_update_all().execute(update)
            self.counters["hit_writes"] += 1
        except Exception:  # counts are advisory (eviction order); never fail a flush for them
            logger.exception("could not write %d cache hit counts", len(hits))

    # ---- deletion --------------------------------------------------------------------

    def invalidate(self, kind: str, value: str | None = None, *,
                   tenant: str | None = None) -> int:
        """Delete entries by tenant, model, id, source id, namespace, or all. -> count.

        `tenant` narrows any kind to one tenant's entries. "model" matches both the model
        that answered and the model the client asked for.
        """
        predicate = _invalidation_filter(kind, value, tenant)
        with self._write_lock:
            self.flush()
            deleted = self._delete(predicate)
        self.counters["invalidated"] += deleted
        return deleted

    def expire(self, now: float) -> int:
        with self._write_lock:
            self.flush()
            deleted = self._delete((col("expires_at") <= lit(float(now))).to_sql())
        self.counters["expired"] += deleted
        return deleted

    def evict(self, max_entries: int, target: int | None = None) -> int:
        """Beyond max_entries, delete the least recently hit entries down to target."""
        with self._write_lock:
            self.flush()
            total = self._table.count_rows()
            if total <= max_entries:
                return 0
            keep = max_entries if target is None else min(target, max_entries)
            table = (self._table.search().select(["id", "last_hit_at", "created_at"])
                     .limit(None).to_arrow())
            order = np.lexsort((table["created_at"].to_numpy(),
                                table["last_hit_at"].to_numpy()))
            ids = table["id"].to_numpy(zero_copy_only=False)[order[: total - keep]]
            deleted = 0
            for start in range(0, len(ids), _DELETE_CHUNK):
                chunk = [str(x) for x in ids[start:start + _DELETE_CHUNK]]
                deleted += self._delete(col("id").isin(chunk).to_sql(), chunk)
        self.counters["evicted"] += deleted
        return deleted

    def _delete(self, predicate: str, ids: list[str] | None = None) -> int:
        """Delete rows matching `predicate` (their `ids`, when known): from the mirror
        first, so no lookup serves a row on its way out, then from the table."""
        if self._memory is not None:
            if ids is None:
                found = (self._table.search().where(predicate).select(["id"]).limit(None)
                         .to_arrow())
                ids = [str(x) for x in found["id"].to_pylist()]
            self._memory.remove(ids)
        return int(self._table.delete(predicate).num_deleted_rows)

    # ---- maintenance -----------------------------------------------------------------

    def optimize(self, *, force: bool = False) -> dict[str, Any]:
        """Compact small fragments, prune old versions, build or update indexes."""
        done: dict[str, Any] = {"indexed": False, "compacted": False}
        with self._write_lock:
            self.flush()
            stats = self._table.stats()
            rows = int(stats["num_rows"])
            fragments = int(stats["fragment_stats"]["num_fragments"])
            indexed = {column for index in self._table.list_indices()
                       for column in index.columns}
            if rows >= min(self.index_threshold, SCALAR_INDEX_ROWS) and not (
                    set(_FILTER_COLUMNS) <= indexed):
                for column in _FILTER_COLUMNS:
                    self._table.create_index(column, config=BTree(), replace=True)
            has_index = "vector" in indexed
            if not has_index and rows >= self.index_threshold:
                self._build_vector_index()
                done["indexed"] = True
                has_index = True
            if force or fragments >= self.compact_after_fragments or (
                    has_index and self._unindexed_rows() >= self.batch_size * 8):
                self._table.optimize(cleanup_older_than=self.cleanup_older_than)
                self.counters["compactions"] += 1
                done["compacted"] = True
        done["fragments_before"] = fragments
        return done

    def _build_vector_index(self) -> None:
        config: Any = (HnswSq(distance_type="cosine") if self.index_type == "IVF_HNSW_SQ"
                       else IvfFlat(distance_type="cosine"))
        self._table.create_index("vector", config=config, replace=True)
        self.counters["index_builds"] += 1

    def vector_index(self) -> str | None:
        for index in self._table.list_indices():
            if "vector" in index.columns:
                return str(index.index_type)
        return None

    def _unindexed_rows(self) -> int:
        for index in self._table.list_indices():
            if "vector" in index.columns:
                stats = self._table.index_stats(index.name)
                return int(stats.num_unindexed_rows) if stats else 0
        return 0

    # ---- introspection ---------------------------------------------------------------

    def count(self) -> int:
        """Live and expired rows in the table plus buffered inserts."""
        with self._buffer_lock:
            buffered = len(self._pending) + len(self._flushing)
        return int(self._table.count_rows()) + buffered

    def entries(self, *, tenant: str | None = None, namespace: str | None = None,
                limit: int = 100) -> list[dict[str, Any]]:
        """The newest entries (buffered ones too), without vectors and answers; prompts cut
        to LISTED_PROMPT_CHARS. Scans at most LIST_SCAN_ROWS table rows."""
        def keep(row: dict[str, Any]) -> bool:
            return ((tenant is None or row["tenant"] == tenant)
                    and (namespace is None or row["namespace"] == namespace))

        with self._buffer_lock:
            buffered = [e.row() for e in (*self._flushing, *self._pending)]
        rows = [{k: row[k] for k in _LISTED_COLUMNS} for row in buffered if keep(row)]
        parts = [_sql(col(name) == lit(value)) for name, value in
                 (("tenant", tenant), ("namespace", namespace)) if value is not None]
        query = self._table.search().select(_LISTED_COLUMNS).limit(LIST_SCAN_ROWS)
        if parts:
            query = query.where(" AND ".join(f"({p})" for p in parts))
        rows += query.to_list()
        rows.sort(key=lambda row: row["created_at"], reverse=True)
        listed = []
        for row in rows[:max(0, limit)]:
            row = {k: row[k] for k in _LISTED_COLUMNS}
            row["prompt"] = (row["prompt"] or "")[:LISTED_PROMPT_CHARS]
            row["source_ids"] = list(row["source_ids"] or [])
            listed.append(row)
        return listed

    def namespace_counts(self, tenant: str | None = None) -> dict[tuple[str, str], int]:
        """Entries (live and expired, buffered too) per (tenant, namespace)."""
        counts: dict[tuple[str, str], int] = {}
        with self._buffer_lock:
            buffered = [(e.tenant, e.namespace) for e in (*self._flushing, *self._pending)]
        query = self._table.search().select(["tenant", "namespace"]).limit(LIST_SCAN_ROWS)
        if tenant is not None:
            query = query.where(_sql(col("tenant") == lit(tenant)))
        table = query.to_arrow()
        pairs = zip(table.column("tenant").to_pylist(), table.column("namespace").to_pylist())
        for pair in [*buffered, *pairs]:
            if tenant is None or pair[0] == tenant:
                counts[pair] = counts.get(pair, 0) + 1
        return counts

    def stats(self) -> dict[str, Any]:
        table_stats = self._table.stats()
        with self._buffer_lock:
            pending_inserts, pending_hits = len(self._pending), len(self._hits)
        return {
            "entries": int(table_stats["num_rows"]) + pending_inserts,
            "pending_inserts": pending_inserts,
            "pending_hit_updates": pending_hits,
            "fragments": int(table_stats["fragment_stats"]["num_fragments"]),
            "vector_index": self.vector_index(),
            **{name: int(value) for name, value in sorted(self.counters.items())},
        }

    def close(self) -> None:
        self.flush()


def _invalidation_filter(kind: str, value: str | None, tenant: str | None) -> str:
    if kind not in INVALIDATION_KINDS:
        raise ValueError(f"unknown invalidation kind {kind!r}; use one of {INVALIDATION_KINDS}")
    if kind != "all" and not value:
        raise ValueError(f"invalidation by {kind} needs a value")
    parts: list[str] = []
    if tenant is not None:
        parts.append(_sql(col("tenant") == lit(tenant)))
    if kind == "tenant":
        parts.append(_sql(col("tenant") == lit(str(value))))
    elif kind == "model":
        parts.append(_sql((col("model") == lit(str(value)))
                          | (col("requested_model") == lit(str(value)))))
    elif kind == "id":
        parts.append(_sql(col("id") == lit(str(value))))
    elif kind == "namespace":
        parts.append(_sql(col("namespace") == lit(str(value))))
    elif kind == "source":
        # lancedb.expr has no array function; lit() still does the quoting.
        parts.append(f"array_has(source_ids, {lit(str(value)).to_sql()})")
    return " AND ".join(f"({part})" for part in parts) or "true"


@dataclass(frozen=True)
class _Matcher:
    """Which of the ranked candidates (best cosine first) a lookup serves."""

    threshold: float
    query_text: str
    guard: GuardFn | None
    verifier: VerifierGate | None
    blocked: BlockedFn | None

    def best(self, ranked: list[tuple[float, dict[str, Any]]]) -> LookupOutcome:
        if not ranked:
            return LookupOutcome(None, None, "empty", 0)
        nearest = ranked[0][0]
        rejected = "below_threshold"
        passed: list[tuple[float, dict[str, Any]]] = []
        for similarity, row in ranked:
            if similarity < self.threshold:
                break
            if self.blocked is not None and self.blocked(row):
                rejected = "feedback"
                continue
            if self.guard is not None:
                verdict = self.guard(self.query_text, row["prompt"])
                if not verdict.ok:
                    rejected = f"guard:{verdict.reason}"
                    continue
            if self.verifier is None:
                hit = _hit_from_row(row, min(similarity, 1.0), "semantic")
                return LookupOutcome(hit, nearest, None, len(ranked))
            passed.append((similarity, row))
            if len(passed) >= self.verifier.candidates:
                break
        if not passed:
            return LookupOutcome(None, nearest, rejected, len(ranked))
        assert self.verifier is not None
        choice, score = self.verifier.pick(
            self.query_text, [(row["prompt"], similarity) for similarity, row in passed])
        if choice is None:
            return LookupOutcome(None, nearest, "verifier", len(ranked), score)
        similarity, row = passed[choice]
        hit = _hit_from_row(row, min(similarity, 1.0), "semantic", score)
        return LookupOutcome(hit, nearest, None, len(ranked), score)


def _sql(expr: Expr) -> str:
    return expr.to_sql()


def _hit_from_row(row: dict[str, Any], similarity: float, match: str,
                  verifier_score: float | None = None) -> CacheHit:
    return CacheHit(entry_id=row["id"], similarity=similarity, match=match,
                    prompt=row["prompt"], answer=row["answer"], model=row["model"],
                    tier=row.get("tier") or "", namespace=row["namespace"],
                    created_at=float(row["created_at"]), expires_at=float(row["expires_at"]),
                    hit_count=int(row.get("hit_count") or 0),
                    source_ids=tuple(row.get("source_ids") or ()),
                    prompt_hash=row.get("prompt_hash") or "", verifier_score=verifier_score)
