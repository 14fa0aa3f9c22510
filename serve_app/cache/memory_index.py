"""An in-memory mirror of the cache table, for lookups.

LanceDB stays the durable store and the source of truth (the mirror is rebuilt from it
when the replica starts); every write goes to both, the mirror first for inserts and
first for deletions too, so a lookup never finds what is being deleted. Why: a filtered
LanceDB query costs 20-100 ms of CPU here whatever the table size (measured in
benchmarks/cache_store_latency.py), far more than the rest of a cache hit; a dict probe
costs microseconds and a brute-force dot product over one tenant's scope is ~1 ms per
10k entries. The table is capped at `cache.max_entries`, which bounds the mirror
(~1.5 KB of vector plus the answer's JSON per entry).

Entries are partitioned by (tenant, scope key), so another tenant's entries are never
candidates; each partition keeps its vectors as one matrix, rebuilt lazily after a
removal. Thread-safe under one lock (lookups run in worker threads).
"""
from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Partition = tuple[str, str]  # (tenant, scope_key)


@dataclass
class _Scope:
    ids: list[str] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    matrix: np.ndarray | None = None  # stacked `vectors`, built on the first search

    def matrix_of(self) -> np.ndarray:
        if self.matrix is None or self.matrix.shape[0] != len(self.ids):
            self.matrix = np.vstack(self.vectors) if self.vectors else np.zeros((0, 1))
        return self.matrix


class MemoryIndex:
    def __init__(self) -> None:
        self._rows: dict[str, dict[str, Any]] = {}  # id -> row, without its vector
        self._by_hash: dict[tuple[str, str, str], str] = {}
        self._scopes: dict[Partition, _Scope] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    # ---- writes ----------------------------------------------------------------------

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        """Rows as the table holds them (`CacheEntry.row()`); vectors are unit-norm."""
        with self._lock:
            for row in rows:
                if row["id"] in self._rows:
                    self._remove_locked({row["id"]})
                # The vector lives once, in its partition (a list of floats would be 9 KB).
                vector = np.asarray(row["vector"], dtype=np.float32)
                row = {name: value for name, value in row.items() if name != "vector"}
                self._rows[row["id"]] = row
                self._by_hash[(row["tenant"], row["scope_key"], row["prompt_hash"])] = row["id"]
                scope = self._scopes.setdefault((row["tenant"], row["scope_key"]), _Scope())
                scope.ids.append(row["id"])
                scope.vectors.append(vector)

    def remove(self, ids: Iterable[str]) -> int:
        with self._lock:
            return self._remove_locked(set(ids))

    def _remove_locked(self, ids: set[str]) -> int:
        gone = [self._rows.pop(i) for i in ids if i in self._rows]
        touched: set[Partition] = set()
        for row in gone:
            key = (row["tenant"], row["scope_key"], row["prompt_hash"])
            if self._by_hash.get(key) == row["id"]:
                del self._by_hash[key]
            touched.add((row["tenant"], row["scope_key"]))
        for partition in touched:
            scope = self._scopes[partition]
            keep = [(i, v) for i, v in zip(scope.ids, scope.vectors) if i in self._rows]
            if not keep:
                del self._scopes[partition]
                continue
            scope.ids = [i for i, _ in keep]
            scope.vectors = [v for _, v in keep]
            scope.matrix = None
        return len(gone)

    def record_hit(self, entry_id: str, now: float) -> None:
        with self._lock:
            row = self._rows.get(entry_id)
            if row is not None:
                row["hit_count"] = int(row.get("hit_count") or 0) + 1
                row["last_hit_at"] = now

    # ---- reads -----------------------------------------------------------------------

    def get(self, entry_id: str) -> dict[str, Any] | None:
        """A copy of the entry's row (live or expired), None when it is not here."""
        with self._lock:
            row = self._rows.get(entry_id)
            return dict(row) if row is not None else None

    def exact(self, tenant: str, scope_key: str, prompt_hash: str,
              now: float) -> dict[str, Any] | None:
        with self._lock:
            entry_id = self._by_hash.get((tenant, scope_key, prompt_hash))
            row = self._rows.get(entry_id) if entry_id is not None else None
        return row if row is not None and row["expires_at"] > now else None

    def nearest(self, tenant: str, scope_key: str, query: np.ndarray, now: float,
                limit: int) -> list[tuple[float, dict[str, Any]]]:
        """Up to `limit` live entries of the partition by cosine similarity, best first."""
        with self._lock:
            scope = self._scopes.get((tenant, scope_key))
            if scope is None:
                return []
            similarities = scope.matrix_of() @ query
            ids = list(scope.ids)
        # Expired entries are skipped below, so look a little past `limit`.
        wanted = min(len(ids), max(limit * 4, limit + 8))
        top = np.argpartition(-similarities, wanted - 1)[:wanted] if wanted < len(ids) \
            else np.arange(len(ids))
        order = top[np.argsort(-similarities[top])]
        found: list[tuple[float, dict[str, Any]]] = []
        for position in order:
            row = self._rows.get(ids[position])
            if row is None or row["expires_at"] <= now:
                continue
            found.append((float(similarities[position]), row))
            if len(found) >= limit:
                break
        return found
