"""The router drift guard: live tier shares per tenant against the calibrated shares."""
from __future__ import annotations

import json

from serve_app.routing.drift import TierDrift, expected_shares


def test_expected_shares_follow_the_thresholds():
    scores = [0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.2, 0.6, 0.8]
    assert expected_shares(scores, 0.15, 0.75) == {"small": 0.2, "medium": 0.5, "large": 0.3}
    assert expected_shares([], 0.1, 0.5) == {}


def test_traffic_that_all_lands_in_one_tier_is_reported_once_per_period():
    """The case that was measured: every prompt above the large-tier cut."""
    now = [0.0]
    drift = TierDrift({"small": 0.2, "medium": 0.5, "large": 0.3}, window=200,
                      min_samples=50, warn_every_s=300, clock=lambda: now[0])
    reports = [drift.observe("acme", "large") for _ in range(49)]
    assert reports == [None] * 49  # too few samples to judge
    report = drift.observe("acme", "large")
    assert report is not None and report.tier == "large" and report.live == 1.0
    assert "acme" in report.message() and "30%" in report.message()
    assert drift.drifting("acme")
    assert all(drift.observe("acme", "large") is None for _ in range(100))  # rate-limited
    now[0] = 301
    assert drift.observe("acme", "large") is not None


def test_traffic_like_the_calibration_is_quiet_and_tenants_are_separate():
    drift = TierDrift({"small": 0.2, "medium": 0.5, "large": 0.3}, window=100, min_samples=50)
    pattern = ["small"] * 2 + ["medium"] * 5 + ["large"] * 3
    assert all(drift.observe("calm", tier) is None for tier in pattern * 30)
    assert not drift.drifting("calm")
    for _ in range(60):
        drift.observe("skewed", "small")
    assert drift.drifting("skewed") and not drift.drifting("calm")
    # the window slides: calibrated traffic brings a tenant back
    for tier in pattern * 20:
        drift.observe("skewed", tier)
    assert not drift.drifting("skewed")


def test_memory_is_bounded_whatever_the_number_of_tenants():
    small, large = (TierDrift({"small": 1.0}, window=10, max_tenants=100) for _ in range(2))
    for i in range(1_000):
        small.observe(f"t{i}", "small")
    for i in range(10_000):
        large.observe(f"t{i}", "small")
    assert len(small._windows) == len(large._windows) == 100
    assert all(len(w.tiers) <= 10 for w in large._windows.values())


def test_the_shipped_model_has_calibration_scores_to_compare_with():
    from serve_app.routing.config import DEFAULT_MODEL_FILE, SHIPPED_MODELS_ROOT

    model = json.loads((SHIPPED_MODELS_ROOT / DEFAULT_MODEL_FILE).read_text())
    thresholds = model["default_thresholds"]
    shares = expected_shares(model["calibration"]["scores"], thresholds["small_below"],
                             thresholds["large_from"])
    assert abs(sum(shares.values()) - 1.0) < 1e-9
