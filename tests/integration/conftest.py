"""Integration fixtures: one Ray cluster and one models app per session; each module
deploys its own stack app (module-scoped) and talks HTTP to it."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from serve_app.local_cluster import LocalStack
from tests.support.keys import ADMIN_ENV


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalStack]:
    # Secrets reach replicas through the environment Ray's processes inherit, never
    # through runtime_env env_vars (Ray writes those to runtime_env_agent.log).
    os.environ.update(ADMIN_ENV)
    test_cluster = LocalStack()
    test_cluster.start()
    yield test_cluster
    test_cluster.shutdown()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
