"""Integration fixtures: one Ray cluster and one models app per session; each module
deploys its own stack app (module-scoped) and talks HTTP to it."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from serve_app.local_cluster import LocalStack


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalStack]:
    test_cluster = LocalStack()
    test_cluster.start()
    yield test_cluster
    test_cluster.shutdown()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
