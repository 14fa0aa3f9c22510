"""Reciprocal rank fusion (Cormack et al., 2009): score(d) = sum over lists of
1 / (k + rank of d in that list), ranks starting at 1. Pure; the store and the benchmark
share it."""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Fused:
    key: Hashable
    score: float
    ranks: tuple[int | None, ...]  # rank in each input list (1-based), None if absent


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hashable]], k: float = 60.0,
                           weights: Sequence[float] | None = None) -> list[Fused]:
    """Fuse ranked lists of keys, best first. Ties: better best rank, then first list."""
    if k <= 0:
        raise ValueError("k must be positive")
    weights = list(weights) if weights is not None else [1.0] * len(rankings)
    if len(weights) != len(rankings):
        raise ValueError("one weight per ranking")
    ranks: dict[Hashable, list[int | None]] = {}
    for index, ranking in enumerate(rankings):
        for rank, key in enumerate(ranking, start=1):
            slot = ranks.setdefault(key, [None] * len(rankings))
            if slot[index] is None:  # a key listed twice counts at its best rank
                slot[index] = rank
    fused = []
    for key, key_ranks in ranks.items():
        score = sum(weight / (k + rank) for weight, rank in zip(weights, key_ranks)
                    if rank is not None)
        fused.append(Fused(key, score, tuple(key_ranks)))
    fused.sort(key=lambda item: (-item.score,
                                 min(rank for rank in item.ranks if rank is not None),
                                 [rank if rank is not None else float("inf")
                                  for rank in item.ranks]))
    return fused
