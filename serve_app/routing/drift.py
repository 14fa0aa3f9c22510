"""Router drift guard: live tier shares per tenant against the calibration's.

The thresholds are calibrated on a score distribution (the model file's calibration
rows). Traffic unlike it routes badly without any error: on a maths set every score
landed above the large-tier cut, so 99.8% of prompts went to the dearest tier. This keeps
the last `window` routing decisions of each tenant (made with the calibrated thresholds)
and reports when a tier's live share is more than `tolerance` away from its calibrated
share, once per `warn_every_s` per tenant. Memory is bounded: at most `max_tenants`
windows (least recently seen dropped) of `window` tiers each.
"""
from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

TIER_NAMES = ("small", "medium", "large")


def expected_shares(scores: Sequence[float], small_below: float,
                    large_from: float) -> dict[str, float]:
    """Tier shares the thresholds give on the calibration scores."""
    if not scores:
        return {}
    total = len(scores)
    small = sum(1 for s in scores if s < small_below)
    large = sum(1 for s in scores if s >= large_from and s >= small_below)
    return {"small": small / total, "medium": (total - small - large) / total,
            "large": large / total}


@dataclass(frozen=True)
class DriftReport:
    tenant: str
    tier: str
    live: float
    expected: float
    samples: int

    def message(self) -> str:
        return (f"router drift for tenant {self.tenant!r}: {self.tier} tier gets "
                f"{self.live:.0%} of the last {self.samples} routed prompts, calibrated "
                f"for {self.expected:.0%}; the thresholds no longer fit this traffic "
                "(retrain or recalibrate: make train-router)")


class _Window:
    def __init__(self, size: int) -> None:
        self.tiers: deque[str] = deque(maxlen=size)
        self.counts: Counter[str] = Counter()
        self.last_warning = float("-inf")
        self.drifting = False  # out of range as of the last decision

    def add(self, tier: str) -> None:
        if len(self.tiers) == self.tiers.maxlen:
            self.counts[self.tiers[0]] -= 1  # O(1): the deque drops its oldest
        self.tiers.append(tier)
        self.counts[tier] += 1


class TierDrift:
    def __init__(self, expected: Mapping[str, float], *, window: int = 500,
                 min_samples: int = 100, tolerance: float = 0.25,
                 warn_every_s: float = 300.0, max_tenants: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.expected = dict(expected)
        self.window = window
        self.min_samples = min_samples
        self.tolerance = tolerance
        self.warn_every_s = warn_every_s
        self.max_tenants = max_tenants
        self.clock = clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def observe(self, tenant: str, tier: str) -> DriftReport | None:
        """Record one decision; a report when this tenant's shares left the calibrated
        range (at most once per warn_every_s per tenant)."""
        if not self.expected:
            return None
        window = self._windows.get(tenant)
        if window is None:
            window = self._windows[tenant] = _Window(self.window)
            while len(self._windows) > self.max_tenants:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(tenant)
        window.add(tier)
        samples = len(window.tiers)
        if samples < self.min_samples:
            return None
        worst = max(TIER_NAMES, key=lambda t: abs(window.counts[t] / samples
                                                  - self.expected.get(t, 0.0)))
        live = window.counts[worst] / samples
        expected = self.expected.get(worst, 0.0)
        window.drifting = abs(live - expected) > self.tolerance
        if not window.drifting:
            return None
        now = self.clock()
        if now - window.last_warning < self.warn_every_s:
            return None
        window.last_warning = now
        return DriftReport(tenant, worst, live, expected, samples)

    def tracked(self, tenant: str) -> bool:
        return tenant in self._windows

    def drifting(self, tenant: str) -> bool:
        """Whether the tenant's window was out of range at its last decision (a gauge)."""
        window = self._windows.get(tenant)
        return window is not None and window.drifting
