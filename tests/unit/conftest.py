"""Shared fixtures of the unit tests: the real local HTTP servers the agent tests talk to."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.scripted_model import RecordingTarget, ScriptedModel


@pytest.fixture(scope="module")
def model() -> Iterator[ScriptedModel]:
    """A scripted OpenAI-compatible model server (one per test module)."""
    server = ScriptedModel().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def target() -> Iterator[RecordingTarget]:
    """An HTTP server that records the requests the http tools send."""
    server = RecordingTarget().start()
    yield server
    server.stop()
