"""Lookups, hits and the similarity of the best candidate per (tenant, namespace), for the
operator console's cache page (pure, no Ray; thread-safe: lookups run in worker threads).

Counts are per SemanticCache replica since it started. Clients choose namespaces, so the
number of tracked scopes is capped; past the cap new ones are counted under "(other)".
"""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Any

# Histogram bin edges of cosine similarity (the last bin is [0.975, 1.0]).
SIMILARITY_EDGES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 1.0)
OVERFLOW_NAMESPACE = "(other)"


@dataclass
class _Scope:
    lookups: int = 0
    hits: int = 0
    skipped: int = 0
    hit_similarity: list[int] = field(default_factory=lambda: [0] * (len(SIMILARITY_EDGES) - 1))
    miss_similarity: list[int] = field(
        default_factory=lambda: [0] * (len(SIMILARITY_EDGES) - 1))


def similarity_bin(similarity: float) -> int:
    """The histogram bin of a cosine in [-1, 1] (negatives fall in the first)."""
    index = bisect.bisect_right(SIMILARITY_EDGES, similarity) - 1
    return min(max(index, 0), len(SIMILARITY_EDGES) - 2)


class NamespaceStats:
    def __init__(self, max_scopes: int = 1000) -> None:
        self.max_scopes = max_scopes
        self._scopes: dict[tuple[str, str], _Scope] = {}
        self._lock = threading.Lock()

    def record(self, tenant: str, namespace: str, *, hit: bool, similarity: float | None,
               skipped: bool = False) -> None:
        """One lookup: a hit, a miss (with its best candidate's similarity, if any) or one
        the policy skipped (no lookup was made)."""
        with self._lock:
            scope = self._scope(tenant, namespace)
            if skipped:
                scope.skipped += 1
                return
            scope.lookups += 1
            scope.hits += int(hit)
            if similarity is not None:
                bins = scope.hit_similarity if hit else scope.miss_similarity
                bins[similarity_bin(similarity)] += 1

    def _scope(self, tenant: str, namespace: str) -> _Scope:
        key = (tenant, namespace)
        scope = self._scopes.get(key)
        if scope is None:
            if len(self._scopes) >= self.max_scopes:
                key = (tenant, OVERFLOW_NAMESPACE)
                scope = self._scopes.get(key)
            if scope is None:
                scope = self._scopes[key] = _Scope()
        return scope

    def snapshot(self, tenant: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            items = sorted(self._scopes.items())
            return [{"tenant": t, "namespace": ns, "lookups": s.lookups, "hits": s.hits,
                     "skipped": s.skipped,
                     "hit_rate": round(s.hits / s.lookups, 4) if s.lookups else None,
                     "similarity": {"edges": list(SIMILARITY_EDGES),
                                    "hits": list(s.hit_similarity),
                                    "misses": list(s.miss_similarity)}}
                    for (t, ns), s in items if tenant is None or t == tenant]
