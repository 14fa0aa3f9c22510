"""A real, throwaway PostgreSQL server for the tests (never a mock).

`postgres_server` (session-scoped) runs `initdb` into a temp dir and starts `postgres` on
127.0.0.1 with a free port and its unix socket inside that dir; fsync stays on (defaults).
Each test takes a fresh database from `server.create_database()`. `server.restart()` stops
and starts the same cluster on the same port, for fault tests. The server is stopped (pg_ctl
stop, i.e. by its postmaster pid) when the session ends.

PostgreSQL refuses to run as root: as root, initdb/pg_ctl run as the `postgres` system user
(Debian's package creates it) through `runuser`, with the temp dir chowned to it. The
binaries come from Debian's `postgresql` package (/usr/lib/postgresql/<major>/bin), which
`make test` / `make test-unit` install; missing binaries fail the tests (never skip).
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN_ENV = "LLMSTACK_PG_BIN"  # optional: a directory holding initdb, pg_ctl and postgres
SYSTEM_USER = "postgres"
SUPERUSER = "llmstack_test"


def find_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin with a postgres binary (or $LLMSTACK_PG_BIN)."""
    override = os.environ.get(BIN_ENV)
    candidates = [override] if override else sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True)
    for candidate in candidates:
        path = Path(candidate)
        if all((path / name).is_file() for name in ("postgres", "initdb", "pg_ctl")):
            return path
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One throwaway cluster: `url(db)`, `create_database()`, `restart()`, `stop()`."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="llmstack-pg-"))
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log_file = self.root / "postgres.log"
        self.port = _free_port()
        self.password = secrets.token_urlsafe(18)  # a real secret: the redaction tests use it
        self._as_root = os.geteuid() == 0
        self.socket_dir.mkdir()
        if self._as_root:
            try:
                user = pwd.getpwnam(SYSTEM_USER)
            except KeyError:
                raise RuntimeError(
                    f"running as root, PostgreSQL needs the {SYSTEM_USER!r} system user "
                    "(Debian's postgresql package creates it): run `make test-unit`") from None
            for path in (self.root, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_root:
            os.chown(pwfile, pwd.getpwnam(SYSTEM_USER).pw_uid, -1)
        pwfile.chmod(0o600)
        self._run("initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "--pwfile", str(pwfile),
                  "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8",
                  "--locale=C.UTF-8", "--no-instructions")
        pwfile.unlink()
        self.start()

    # ------------------------------------------------------------------ processes
    def _command(self, name: str, *args: str) -> list[str]:
        command = [str(self.bin_dir / name), *args]
        return ["runuser", "-u", SYSTEM_USER, "--", *command] if self._as_root else command

    def _run(self, name: str, *args: str) -> None:
        result = subprocess.run(self._command(name, *args), capture_output=True, text=True,
                                timeout=120, cwd=self.root)
        if result.returncode != 0:
            raise RuntimeError(f"{name} failed ({result.returncode}): "
                               f"{result.stdout[-2000:]}{result.stderr[-2000:]}")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 "
                   "-c max_connections=200 -c shared_buffers=32MB")
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
                  "-t", "60", "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast") -> None:
        """Stop and start the same cluster on the same port: every open connection dies."""
        self.stop(mode)
        self.start()

    def postmaster_pid(self) -> int | None:
        pid_file = self.data_dir / "postmaster.pid"
        try:
            return int(pid_file.read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None

    def cleanup(self) -> None:
        if self.postmaster_pid() is not None:
            try:
                self.stop("immediate")
            except RuntimeError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ databases
    def url(self, database: str = "postgres") -> str:
        return (f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}")

    def admin_connect(self, database: str = "postgres"):  # -> psycopg.Connection
        import psycopg

        return psycopg.connect(self.url(database), autocommit=True)

    def create_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        name = "t_" + uuid.uuid4().hex[:16]
        with self.admin_connect() as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.fail("PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/"
                    "postgres): `make test-unit` installs Debian's postgresql package, or "
                    f"`apt-get install -y postgresql`, or point ${BIN_ENV} at a bin directory.",
                    pytrace=False)
    server = PostgresServer(bin_dir)
    try:
        yield server
    finally:
        server.cleanup()
