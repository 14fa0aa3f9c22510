"""Routing policy: aliases and explicit models, thresholds, per-key overrides, calibration;
router settings validation and the offline default."""
from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from serve_app.routing.config import PolicySettings, ProviderSettings, RouterSettings
from serve_app.routing.policy import (
    CalibrationData,
    RoutingPolicy,
    Thresholds,
    calibrate,
    calibrate_quality,
    calibrate_shares,
    pareto_front,
    threshold_grid,
)

LOCAL_NAME = "smollm2-135m-instruct"


@pytest.fixture
def policy() -> RoutingPolicy:
    settings = RouterSettings()
    return RoutingPolicy(settings.policy, Thresholds(0.2, 0.7),
                         settings.explicit_targets(LOCAL_NAME))


@pytest.mark.parametrize("score,tier", [(0.0, "small"), (0.199, "small"), (0.2, "medium"),
                                        (0.69, "medium"), (0.7, "large"), (1.0, "large")])
def test_score_to_tier(score, tier):
    assert Thresholds(0.2, 0.7).tier(score) == tier


def test_thresholds_must_be_ordered():
    with pytest.raises(ValueError):
        Thresholds(0.8, 0.3)
    with pytest.raises(ValueError):
        Thresholds(-0.1, 0.3)


def test_auto_alias_and_tier_aliases(policy):
    assert policy.resolve("auto").kind == "auto"
    for tier in ("small", "medium", "large"):
        request = policy.resolve(tier)
        assert request.kind == "tier" and request.tier == tier


def test_explicit_models_bypass_the_classifier(policy):
    assert policy.resolve(LOCAL_NAME).kind == "explicit"
    assert policy.resolve(LOCAL_NAME).target == "local"
    assert policy.resolve("gpt-4o").target == "openai-frontier"      # provider model id
    assert policy.resolve("openai-mini").target == "openai-mini"     # provider name
    assert policy.resolve("no-such-model") is None


def test_gateway_side_policy_needs_no_thresholds():
    settings = RouterSettings()
    gateway = RoutingPolicy(settings.policy, explicit_targets=settings.explicit_targets("m"))
    assert gateway.resolve("m").target == "local"
    with pytest.raises(ValueError, match="no thresholds"):
        gateway.tier_for(0.5)


def test_explicit_chain_is_only_the_target_unless_configured(policy):
    chains = {"small": ["local", "openai-mini"], "medium": ["openai-mini", "local"],
              "large": ["openai-frontier", "openai-mini"]}
    assert policy.explicit_chain("openai-mini", chains) == ["openai-mini"]
    lenient = RoutingPolicy(PolicySettings(explicit_fallback=True), Thresholds(0.2, 0.7))
    assert lenient.explicit_chain("openai-mini", chains) == ["openai-mini", "local"]


def test_per_key_override(policy):
    assert policy.tier_for(0.5) == "medium"
    assert policy.tier_for(0.5, {"large_from": 0.4}) == "large"
    assert policy.tier_for(0.5, {"small_below": 0.6, "large_from": 0.9}) == "small"
    assert policy.tier_for(0.5, Thresholds(0.0, 0.0)) == "large"
    strict = RoutingPolicy(PolicySettings(allow_key_overrides=False), Thresholds(0.2, 0.7))
    assert strict.tier_for(0.5, {"large_from": 0.4}) == "medium"


def _data(n: int = 400, seed: int = 0) -> CalibrationData:
    """Scores that predict which prompts only the large tier answers."""
    rng = np.random.default_rng(seed)
    scores = rng.random(n)
    large = np.ones(n)
    medium = (scores < 0.6).astype(float)      # medium fails exactly on hard prompts
    small = (scores < 0.2).astype(float)       # small only on the easiest
    cost = {"small": np.zeros(n), "medium": np.full(n, 1.0), "large": np.full(n, 10.0)}
    return CalibrationData(scores, {"small": small, "medium": medium, "large": large}, cost)


def test_quality_calibration_finds_the_cheap_split():
    data = _data()
    thresholds = calibrate_quality(data, keep_quality=1.0)
    result = data.evaluate(thresholds)
    assert result["quality"] == pytest.approx(1.0)
    assert 0.15 <= thresholds.small_below <= 0.21
    assert 0.55 <= thresholds.large_from <= 0.61
    assert result["cost"] < 0.5 * data.all_tier("large")["cost"]


def test_lower_quality_target_is_never_more_expensive():
    data = _data()
    costs = [data.evaluate(calibrate_quality(data, keep))["cost"] for keep in (1.0, 0.95, 0.8)]
    assert costs[0] >= costs[1] >= costs[2]
    for keep in (0.95, 0.8):
        assert data.evaluate(calibrate_quality(data, keep))["quality"] >= keep - 1e-9


def test_pareto_front_is_monotone():
    front = pareto_front(threshold_grid(_data(), points=21))
    costs = [p["cost"] for p in front]
    qualities = [p["quality"] for p in front]
    assert costs == sorted(costs)
    assert qualities == sorted(qualities)
    assert front[-1]["quality"] == pytest.approx(1.0)


def test_share_calibration():
    scores = np.linspace(0, 1, 1001)
    thresholds = calibrate_shares(scores, large_share=0.3, small_share=0.2)
    tiers = [thresholds.tier(s) for s in scores]
    assert tiers.count("large") / len(tiers) == pytest.approx(0.3, abs=0.002)
    assert tiers.count("small") / len(tiers) == pytest.approx(0.2, abs=0.002)
    none_large = calibrate_shares(scores, large_share=0.0, small_share=0.0)
    assert {none_large.tier(s) for s in scores[:-1]} == {"medium"}


def test_calibrate_from_settings():
    rows = {"scores": [0.1, 0.5, 0.9, 0.95], "medium_correct": [1, 1, 0, 0],
            "large_correct": [1, 1, 1, 1], "tokens_in": [100, 100, 100, 100]}
    prices = RouterSettings().tier_prices()
    fixed = PolicySettings.model_validate({"thresholds": {"small_below": 0.3,
                                                          "large_from": 0.6}})
    assert calibrate(fixed, rows, prices) == Thresholds(0.3, 0.6)
    quality = calibrate(PolicySettings.model_validate(
        {"calibration": {"keep_quality": 1.0, "small_accuracy": 0.0}}), rows, prices)
    assert [quality.tier(s) for s in rows["scores"]] == ["medium", "medium", "large", "large"]
    shares = calibrate(PolicySettings.model_validate(
        {"calibration": {"mode": "share", "large_share": 0.5, "small_share": 0.25}}),
        rows, prices)
    assert [shares.tier(s) for s in rows["scores"]] == ["small", "medium", "large", "large"]
    with pytest.raises(ValueError, match="thresholds"):
        calibrate(PolicySettings(), None, prices)


# ----------------------------------------------------------------------------- settings
def test_provider_settings_take_an_env_var_name_never_a_key():
    with pytest.raises(ValidationError, match="NAME of an environment variable"):
        ProviderSettings(name="p", base_url="https://x/v1", model="m",
                         api_key_env="sk-live-abc123-xyz")
    with pytest.raises(ValidationError):
        ProviderSettings(name="auto", base_url="https://x/v1", model="m")
    with pytest.raises(ValidationError):
        ProviderSettings(name="p", base_url="ftp://x", model="m")


def test_chains_must_name_known_targets():
    with pytest.raises(ValidationError, match="unknown targets"):
        RouterSettings.model_validate({"tiers": {"large": ["nope"]}})
    with pytest.raises(ValidationError):
        RouterSettings.model_validate({"tiers": {"large": []}})
    with pytest.raises(ValidationError):
        RouterSettings.model_validate({"unknown_key": 1})


def test_offline_default_falls_back_to_local_and_says_so():
    settings = RouterSettings()
    environ: dict[str, str] = {}
    assert settings.resolved_chain("small", environ) == ["local", "openai-mini"]
    assert settings.resolved_chain("medium", environ)[-1] == "local"
    assert settings.resolved_chain("large", environ)[-1] == "local"
    notes = settings.offline_notes(environ)
    assert len(notes) == 2 and all("OPENAI_API_KEY" in note for note in notes)
    assert any("tier medium answers from local" in note for note in notes)


def test_a_chain_without_local_gets_it_appended_when_nothing_is_available():
    settings = RouterSettings.model_validate({"tiers": {"large": ["openai-frontier"]}})
    assert settings.resolved_chain("large", {}) == ["openai-frontier", "local"]
    assert settings.resolved_chain("large", {"OPENAI_API_KEY": "k"}) == ["openai-frontier"]
    assert settings.offline_notes({"OPENAI_API_KEY": "k"}) == []


def test_costs_use_the_target_prices():
    settings = RouterSettings()
    assert settings.target_cost_usd("openai-frontier", 1_000_000, 0) == pytest.approx(2.5)
    assert settings.target_cost_usd("openai-mini", 0, 1_000_000) == pytest.approx(0.6)
    assert settings.target_cost_usd("local", 10_000, 10_000) == 0.0
    assert settings.tier_prices()["large"] == (2.5, 10.0)
