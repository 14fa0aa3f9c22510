from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray's control plane as under `make run`: token auth with the same token file (created once,
# mode 600) and loopback ports, set before anything imports ray (Ray reads it at import).
from deployments.launch import ray_control_plane_env  # noqa: E402
from serve_app.settings import PROJECT_ROOT  # noqa: E402

os.environ.update(ray_control_plane_env(PROJECT_ROOT / "var"))


import pytest  # noqa: E402

from tests.support.postgres import postgres_server  # noqa: E402,F401 (session fixture)

# A stack app whose args set `database: {url_env: TEST_DATABASE_ENV}` keeps its accounts,
# ledger, sessions and audit log in the session's PostgreSQL server (tests/integration/
# test_gateway.py); the others use their SQLite files.
TEST_DATABASE_ENV = "LLMSTACK_TEST_DATABASE_URL"


@pytest.fixture(scope="session")
def cluster(postgres_server):
    """One Ray cluster and one models app per test session (integration and security
    suites share it); each module deploys its own stack app."""
    from deployments.local_cluster import LocalStack
    from tests.support.keys import ADMIN_ENV

    # Secrets reach replicas through the environment Ray's processes inherit, never
    # through runtime_env env_vars (Ray writes those to runtime_env_agent.log); the
    # database URL holds a password, so it goes the same way, before Ray starts.
    os.environ.update(ADMIN_ENV)
    os.environ[TEST_DATABASE_ENV] = postgres_server.create_database()
    test_cluster = LocalStack()
    test_cluster.start()
    yield test_cluster
    test_cluster.shutdown()
