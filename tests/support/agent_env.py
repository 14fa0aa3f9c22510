"""Shared helpers for the agent tests: settings, a fake clock, a service on a scripted model."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serve_app.agent.access import Principal
from serve_app.agent.config import AgentSettings
from serve_app.agent.llm_port import OpenAICompatibleLLM
from serve_app.agent.runner import AgentService
from tests.support.scripted_model import RecordingTarget, ScriptedModel


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


# ------------------------------------------------------------------ shared fixtures
# Test modules outside tests/unit import these (`from tests.support.agent_env import
# scripted_model, recording_target`): real local HTTP servers, one per module.
@pytest.fixture(scope="module")
def scripted_model() -> Iterator[ScriptedModel]:
    server = ScriptedModel().start()
    yield server
    server.stop()


@pytest.fixture(name="agent")
def agent_service(tmp_path: Path, scripted_model: ScriptedModel) -> Iterator[AgentService]:
    """An AgentService over the module's scripted model, closed after the test."""
    svc = service(tmp_path, scripted_model)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def recording_target() -> Iterator[RecordingTarget]:
    server = RecordingTarget().start()
    yield server
    server.stop()


def principal(key_id: str, tenant: str = "t1", **policy: Any) -> Principal:
    return Principal(key_id=key_id, tenant_id=tenant, **policy)


def available_limits() -> list[str]:
    """The run-wide limits backends that work on this machine (the fallback always)."""
    from serve_app.agent.config import SandboxSettings
    from serve_app.agent.sandbox_limits import LimitsFactory, LimitsUnavailable

    found = []
    for backend in ("cgroup2", "cgroup1", "rlimits"):
        try:
            factory = LimitsFactory(SandboxSettings(limits=backend), os.geteuid() == 0)
        except LimitsUnavailable:
            continue
        if factory.backend == backend:
            found.append(backend)
    return found
