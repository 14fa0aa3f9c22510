"""Shared helpers for the agent tests: settings, a fake clock, a service on a scripted model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from serve_app.agent.config import AgentSettings
from serve_app.agent.llm_port import OpenAICompatibleLLM
from serve_app.agent.runner import AgentService
from tests.support.scripted_model import ScriptedModel


class FakeClock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def settings(**overrides: Any) -> AgentSettings:
    base: dict[str, Any] = {
        "model": "scripted",
        "default_tools": ["python", "files.read", "files.list", "files.write",
                          "files.delete", "http.get", "http.post", "retrieve"],
        "sandbox": {"wall_seconds": 20, "cpu_seconds": 5},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return AgentSettings.model_validate(base)


def service(data_dir: Path, model: ScriptedModel, **kwargs: Any) -> AgentService:
    settings_overrides = kwargs.pop("settings", {})
    return AgentService(settings(**settings_overrides), data_dir,
                        OpenAICompatibleLLM(model.base_url, timeout_s=30), **kwargs)
