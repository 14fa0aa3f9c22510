"""Shared fixtures of the unit tests: the real local HTTP servers the agent tests talk to,
and the database backends every store test runs against (SQLite files and a real,
throwaway PostgreSQL server)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.postgres import PostgresServer
from tests.support.scripted_model import RecordingTarget, ScriptedModel

DbTarget = Callable[[str], "Path | str"]


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


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def db_url(backend: str, request: pytest.FixtureRequest) -> str | None:
    """A fresh PostgreSQL database's URL (one server per session), or None for SQLite."""
    if backend == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()


@pytest.fixture
def db_target(db_url: str | None, tmp_path: Path) -> DbTarget:
    """`db_target("a.db")`: where a store lives: that SQLite file under tmp_path, or (on
    PostgreSQL) the test's one database, shared by every store like in a cluster."""
    def locate(name: str) -> Path | str:
        return db_url if db_url is not None else tmp_path / name
    return locate
