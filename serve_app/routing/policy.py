"""Routing policy, pure: model name -> route request; score -> tier via thresholds;
thresholds from a calibration target. No Ray, no I/O.

Tiers by score s in [0, 1] (higher = harder): s < small_below -> small,
small_below <= s < large_from -> medium, s >= large_from -> large.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from serve_app.quota.pricing import token_cost_usd
from serve_app.routing.config import LOCAL_TARGET, TIERS, CalibrationSettings, PolicySettings

RouteKind = Literal["auto", "tier", "explicit"]


@dataclass(frozen=True)
class Thresholds:
    small_below: float
    large_from: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.small_below <= self.large_from <= 1.0:
            raise ValueError(f"thresholds must satisfy 0 <= small_below <= large_from <= 1, "
                             f"got {self.small_below}, {self.large_from}")

    def tier(self, score: float) -> str:
        if score < self.small_below:
            return "small"
        if score >= self.large_from:
            return "large"
        return "medium"

    def as_dict(self) -> dict[str, float]:
        return {"small_below": self.small_below, "large_from": self.large_from}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> "Thresholds":
        return cls(float(value["small_below"]), float(value["large_from"]))


@dataclass(frozen=True)
class RouteRequest:
    """What a request's `model` asks for, before any classifier runs.

    kind=auto: classify, then `tier`; kind=tier: an alias (small/medium/large), walk that
    tier's chain; kind=explicit: one named target (`target`), the classifier is bypassed.
    """

    kind: RouteKind
    tier: str | None = None
    target: str | None = None


class RoutingPolicy:
    """Name resolution (gateway side) and score -> tier (classifier side). The gateway
    needs no thresholds: the ComplexityClassifier deployment applies them."""

    def __init__(self, settings: PolicySettings, thresholds: Thresholds | None = None,
                 explicit_targets: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.thresholds = thresholds
        self.explicit_targets = dict(explicit_targets or {})

    def resolve(self, model: str) -> RouteRequest | None:
        """None: the name is neither an alias nor a known model (the gateway answers 404)."""
        if model == self.settings.auto_alias:
            return RouteRequest("auto")
        if model in TIERS:
            return RouteRequest("tier", tier=model)
        target = self.explicit_targets.get(model)
        if target is not None:
            return RouteRequest("explicit", target=target)
        return None

    def thresholds_for(self, override: Mapping[str, Any] | Thresholds | None = None) -> Thresholds:
        """The key's own thresholds when it has some and overrides are allowed."""
        if self.thresholds is None:
            raise ValueError("this policy has no thresholds (the classifier applies them)")
        if override is None or not self.settings.allow_key_overrides:
            return self.thresholds
        if isinstance(override, Thresholds):
            return override
        merged = {**self.thresholds.as_dict(), **{k: v for k, v in override.items()
                                                  if k in ("small_below", "large_from")}}
        return Thresholds.from_dict(merged)

    def tier_for(self, score: float, override: Mapping[str, Any] | Thresholds | None = None) -> str:
        return self.thresholds_for(override).tier(score)

    def explicit_chain(self, target: str, tier_chains: Mapping[str, list[str]]) -> list[str]:
        """The targets tried for an explicit model: only it, or (explicit_fallback) it and
        the rest of the first tier chain that starts with it."""
        if not self.settings.explicit_fallback:
            return [target]
        for tier in TIERS:
            chain = list(tier_chains.get(tier, []))
            if chain and chain[0] == target:
                return chain
        return [target] if target != LOCAL_TARGET else [LOCAL_TARGET]


# ----------------------------------------------------------------------------- calibration
@dataclass
class CalibrationData:
    """Per prompt: its score, whether each tier answers it correctly (a probability for
    tiers without labels), and each tier's cost for it. Arrays of equal length."""

    scores: np.ndarray
    correct: dict[str, np.ndarray]  # tier -> 0/1 or expected correctness
    cost: dict[str, np.ndarray]     # tier -> USD per prompt

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        n = len(self.scores)
        for table in (self.correct, self.cost):
            for tier in TIERS:
                table[tier] = np.broadcast_to(np.asarray(table[tier], dtype=np.float64), (n,))

    def evaluate(self, thresholds: Thresholds) -> dict[str, float]:
        small = self.scores < thresholds.small_below
        large = self.scores >= thresholds.large_from
        return self._evaluate_masks(small, large)

    def _evaluate_masks(self, small: np.ndarray, large: np.ndarray) -> dict[str, float]:
        medium = ~small & ~large
        n = max(len(self.scores), 1)
        quality = (self.correct["small"][small].sum() + self.correct["medium"][medium].sum()
                   + self.correct["large"][large].sum()) / n
        cost = (self.cost["small"][small].sum() + self.cost["medium"][medium].sum()
                + self.cost["large"][large].sum())
        return {"quality": float(quality), "cost": float(cost),
                "share_small": float(small.mean()) if len(small) else 0.0,
                "share_medium": float(medium.mean()) if len(medium) else 0.0,
                "share_large": float(large.mean()) if len(large) else 0.0}

    def all_tier(self, tier: str) -> dict[str, float]:
        n = len(self.scores)
        return {"quality": float(self.correct[tier].mean()) if n else 0.0,
                "cost": float(self.cost[tier].sum())}


def candidate_cuts(scores: np.ndarray, points: int = 101) -> np.ndarray:
    """Threshold candidates: every distinct score when there are few, else score
    quantiles; plus both ends (0: nothing below, just above 1: nothing at or above)."""
    scores = np.asarray(scores, dtype=np.float64)
    inner = np.unique(scores) if len(np.unique(scores)) <= points else \
        np.quantile(scores, np.linspace(0, 1, points))
    return np.unique(np.concatenate([[0.0], inner, [1.0 + 1e-9]]).clip(0.0, 1.0 + 1e-9))


def grid_arrays(data: CalibrationData, points: int = 101) -> dict[str, np.ndarray]:
    """Quality, cost and shares of every (small_below <= large_from) pair of candidate
    cuts, vectorised with cumulative sums over the rows sorted by score."""
    order = np.argsort(data.scores, kind="stable")
    ordered = data.scores[order]
    n = len(ordered)

    def cumulative(values: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(values[order])])

    q = {tier: cumulative(data.correct[tier]) for tier in TIERS}
    c = {tier: cumulative(data.cost[tier]) for tier in TIERS}
    cuts = candidate_cuts(data.scores, points)
    below = np.searchsorted(ordered, cuts, side="left")  # rows with score < cut
    low, high = np.triu_indices(len(cuts))
    i, j = below[low], below[high]
    quality = (q["small"][i] + q["medium"][j] - q["medium"][i] + q["large"][n] - q["large"][j])
    cost = c["small"][i] + c["medium"][j] - c["medium"][i] + c["large"][n] - c["large"][j]
    denominator = max(n, 1)
    return {"small_below": np.minimum(cuts[low], 1.0), "large_from": np.minimum(cuts[high], 1.0),
            "quality": quality / denominator, "cost": cost,
            "share_small": i / denominator, "share_medium": (j - i) / denominator,
            "share_large": (n - j) / denominator}


def threshold_grid(data: CalibrationData, points: int = 101) -> list[dict[str, float]]:
    """Every (small_below <= large_from) pair of candidate cuts with its quality and cost."""
    arrays = grid_arrays(data, points)
    keys = list(arrays)
    return [{key: float(arrays[key][k]) for key in keys} for k in range(len(arrays["cost"]))]


def pareto_front(points: list[dict[str, float]]) -> list[dict[str, float]]:
    """Points no other point beats on both cost (lower) and quality (higher), by cost."""
    front: list[dict[str, float]] = []
    best_quality = -1.0
    for point in sorted(points, key=lambda p: (p["cost"], -p["quality"])):
        if point["quality"] > best_quality + 1e-12:
            front.append(point)
            best_quality = point["quality"]
    return front


def calibrate_quality(data: CalibrationData, keep_quality: float,
                      reference_tier: str = "large", points: int = 101) -> Thresholds:
    """Cheapest thresholds whose quality is at least keep_quality x the all-reference
    quality on the calibration rows (ties: the higher quality). Falls back to
    all-reference when no cheaper point reaches the target."""
    target = keep_quality * data.all_tier(reference_tier)["quality"]
    grid = grid_arrays(data, points)
    feasible = np.flatnonzero(grid["quality"] >= target - 1e-12)
    if len(feasible) == 0:
        return Thresholds(0.0, 0.0)
    best = feasible[np.lexsort((-grid["quality"][feasible], grid["cost"][feasible]))[0]]
    return Thresholds(float(grid["small_below"][best]), float(grid["large_from"][best]))


def calibrate_shares(scores: np.ndarray, large_share: float, small_share: float) -> Thresholds:
    """The lowest `small_share` of scores go small, the highest `large_share` go large."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        raise ValueError("share calibration needs scores")
    small_below = float(np.quantile(scores, small_share)) if small_share > 0 else 0.0
    large_from = float(np.quantile(scores, 1 - large_share)) if large_share > 0 else 1.0
    if large_share > 0 and large_share < 1:
        large_from = float(np.nextafter(large_from, -np.inf)) if large_from > 0 else large_from
    large_from = min(max(large_from, small_below), 1.0)
    return Thresholds(min(small_below, large_from), large_from)


def calibration_data(calibration_rows: Mapping[str, Any], settings: CalibrationSettings,
                     tier_prices: Mapping[str, tuple[float, float]]) -> CalibrationData:
    """Build CalibrationData from a model file's `calibration` block and tier prices."""
    tokens_in = np.asarray(calibration_rows["tokens_in"], dtype=np.float64)
    tokens_out = float(settings.assumed_output_tokens)
    cost = {tier: token_cost_usd(tokens_in, tokens_out, *tier_prices[tier]) for tier in TIERS}
    correct = {"small": np.full(len(tokens_in), settings.small_accuracy),
               "medium": np.asarray(calibration_rows["medium_correct"], dtype=np.float64),
               "large": np.asarray(calibration_rows["large_correct"], dtype=np.float64)}
    return CalibrationData(np.asarray(calibration_rows["scores"]), correct, cost)


def calibrate(settings: PolicySettings, calibration_rows: Mapping[str, Any] | None,
              tier_prices: Mapping[str, tuple[float, float]]) -> Thresholds:
    """Thresholds from settings: fixed ones, or calibrated on the model file's rows."""
    if settings.thresholds is not None:
        return Thresholds(settings.thresholds.small_below, settings.thresholds.large_from)
    if not calibration_rows:
        raise ValueError("the model file has no calibration rows; set router.policy."
                         "thresholds explicitly")
    target = settings.calibration
    if target.mode == "share":
        return calibrate_shares(np.asarray(calibration_rows["scores"]), target.large_share,
                                target.small_share)
    data = calibration_data(calibration_rows, target, tier_prices)
    return calibrate_quality(data, target.keep_quality)
