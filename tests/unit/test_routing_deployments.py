"""The Serve shells (ComplexityClassifier, RemoteLLM) built without a cluster: the
deployment's own class, called directly, against a model file and the fake provider."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deployments.classifier import ComplexityClassifier
from deployments.remote_llm import RemoteLLM
from serve_app.routing.policy import Thresholds
from tests.support.fake_provider import FakeProvider, Fault
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


def test_classifier_shell_without_model_file_fails_clearly(tmp_path: Path):
    with pytest.raises(ValueError, match="serve_app.routing.train"):
        ComplexityClassifier.func_or_class({"data_dir": str(tmp_path)})


async def test_remote_llm_shell():
    with FakeProvider("provider-a") as fake:
        settings = {"router": {
            "providers": [{"name": "provider-a", "base_url": fake.base_url, "model": "m-a",
                           "retry": {"max_retries": 0}}],
            "tiers": {"small": ["local"], "medium": ["provider-a"], "large": ["provider-a"]}}}
        shell = RemoteLLM.func_or_class(settings)
        body = await shell.chat("provider-a", REQUEST, "r1")
        assert body["choices"][0]["message"]["content"] == fake.reply
        chunks = [c async for c in shell.chat_stream("provider-a", REQUEST, "r2")]
        assert chunks[-1]["usage"]["total_tokens"] > 0
        fake.set_default(Fault(status=500))
        failed = await shell.chat("provider-a", REQUEST, "r3")
        assert failed["__error__"] and failed["hop"] == "500"
        assert shell.status()["provider-a"]["consecutive_failures"] == 1
        assert "api_key" not in json.dumps(shell.status())
