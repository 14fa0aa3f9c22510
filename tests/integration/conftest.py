"""Integration fixtures: the session's Ray cluster (`cluster`, in tests/conftest.py, shared
with tests/security); each module deploys its own stack app (module-scoped) and talks HTTP
to it."""
from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
