"""The ComplexityClassifier shell (the deployment's own class, called directly, against a
model file) and the in-process provider targets against the fake provider; no cluster."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deployments.classifier import ComplexityClassifier
from serve_app.errors import ApiError
from serve_app.routing.config import RouterSettings
from serve_app.routing.remote import RemoteProviders
from serve_app.routing.policy import Thresholds
from tests.support.fake_provider import FakeProvider, Fault
from serve_app.routing.config import DEFAULT_MODEL_FILE, SHIPPED_MODELS_ROOT
from tests.unit.test_routing_classifier import payload_for

REQUEST = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}


def test_classifier_shell(tmp_path: Path):
    payload, vectors, texts = payload_for()
    payload["calibration"] = {"scores": [0.1, 0.4, 0.6, 0.9], "medium_correct": [1, 1, 0, 0],
                              "large_correct": [1, 1, 1, 1], "tokens_in": [50] * 4}
    (tmp_path / "models" / "router").mkdir(parents=True)
    (tmp_path / "models" / "router" / "complexity-v1.json").write_text(json.dumps(payload))
    settings = {"data_dir": str(tmp_path),
                "router": {"policy": {"thresholds": {"small_below": 0.25, "large_from": 0.75}}}}
    shell = ComplexityClassifier.func_or_class(settings)
    result = shell.classify(texts[0], np.asarray(vectors[0]).tolist())
    assert set(result) == {"score", "tier", "model_version"}
    assert result["tier"] == Thresholds(0.25, 0.75).tier(result["score"])
    forced = shell.classify(texts[0], np.asarray(vectors[0]).tolist(),
                            {"small_below": 0.0, "large_from": 0.0})
    assert forced["tier"] == "large"
    assert shell.info()["thresholds"] == {"small_below": 0.25, "large_from": 0.75}
    calibrated = ComplexityClassifier.func_or_class({"data_dir": str(tmp_path)})
    assert calibrated.info()["thresholds"]["large_from"] <= 0.6


def test_classifier_shell_warns_when_a_tenants_traffic_leaves_the_calibration(tmp_path: Path,
                                                                              caplog):
    payload, vectors, texts = payload_for()
    payload["calibration"] = {"scores": [0.1, 0.4, 0.6, 0.9], "medium_correct": [1, 1, 0, 0],
                              "large_correct": [1, 1, 1, 1], "tokens_in": [50] * 4}
    (tmp_path / "models" / "router").mkdir(parents=True)
    (tmp_path / "models" / "router" / "complexity-v1.json").write_text(json.dumps(payload))
    shell = ComplexityClassifier.func_or_class({"data_dir": str(tmp_path), "router": {
        "policy": {"thresholds": {"small_below": 0.25, "large_from": 0.75}}}})
    vector = np.asarray(vectors[0]).tolist()
    with caplog.at_level("WARNING"):
        tiers = {shell.classify(texts[0], vector, None, "acme")["tier"] for _ in range(150)}
    assert len(tiers) == 1  # one prompt, one tier: far from the calibrated 25/50/25
    assert "router drift for tenant 'acme'" in caplog.text
    assert caplog.text.count("router drift") == 1  # once per period, not per request
    assert shell._drift.drifting("acme") and not shell._drift.drifting("other")


def test_classifier_shell_without_model_file_fails_clearly(tmp_path: Path):
    absent = tmp_path / "absent" / "complexity-v1.json"
    with pytest.raises(ValueError, match="training.train_router"):
        ComplexityClassifier.func_or_class({"data_dir": str(tmp_path), "router": {
            "classifier": {"model_path": str(absent)}}})


def test_classifier_serves_the_shipped_model_without_training_data(tmp_path: Path):
    """A clone with no ../shared and an empty data dir still routes: the repository ships
    the model file, with its training-data fingerprint and held-out metrics."""
    shell = ComplexityClassifier.func_or_class({"data_dir": str(tmp_path)})
    info = shell.info()
    shipped = json.loads((SHIPPED_MODELS_ROOT / DEFAULT_MODEL_FILE).read_text())
    assert info["model_version"] == shipped["model_version"]
    assert shipped["training"]["data_hash"] and shipped["metrics"]["val"]
    result = shell.classify("What is 2 + 2?", [0.0] * 384)
    assert 0.0 <= result["score"] <= 1.0 and result["tier"] in ("small", "medium", "large")


async def test_providers_as_in_process_targets():
    """API providers are called from the pipeline's own process (no deployment hop): one
    target per provider, completions and streams, failures as payloads for the fallback
    walker, a deadline as 504."""
    with FakeProvider("provider-a") as fake:
        router = RouterSettings.model_validate({
            "providers": [{"name": "provider-a", "base_url": fake.base_url, "model": "m-a",
                           "retry": {"max_retries": 0}}],
            "tiers": {"small": ["local"], "medium": ["provider-a"], "large": ["provider-a"]}})
        providers = RemoteProviders(router)
        target = providers.target_calls("provider-a", timeout_s=5)
        body = await target.complete(REQUEST, "r1")
        assert body["choices"][0]["message"]["content"] == fake.reply
        chunks = [c async for c in target.stream(REQUEST, "r2")]
        assert chunks[-1]["usage"]["total_tokens"] > 0
        fake.set_default(Fault(status=500))
        failed = await target.complete(REQUEST, "r3")
        assert failed["__error__"] and failed["hop"] == "500"
        assert providers.status()["provider-a"]["consecutive_failures"] == 1
        assert "api_key" not in json.dumps(providers.status())
        fake.set_default(Fault(latency_s=2.0))
        with pytest.raises(ApiError) as slow:
            await providers.target_calls("provider-a", timeout_s=0.3).complete(REQUEST, "r4")
        assert slow.value.status == 504 and slow.value.code == "upstream_timeout"
        await providers.aclose()
