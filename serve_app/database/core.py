"""One small interface over sqlite3 (the embedded default) and psycopg 3 (PostgreSQL).

SQL is written once, with `?` placeholders (translated to `%s` for psycopg), in a dialect
both accept; a statement that cannot be portable is a `Dialects(sqlite=..., postgresql=...)`.
Rows come back as dicts. Each store owns one `Database` (one connection, guarded by a lock,
so it is safe to share between threads).

Transactions are explicit: `with db.transaction() as tx:` (SQLite: BEGIN IMMEDIATE, which
takes the write lock first; PostgreSQL: a normal READ COMMITTED transaction), or
`db.run(fn, idempotent=...)`, which may run `fn(tx)` again.

A lost PostgreSQL connection (server restart, failover, network) is replaced on the next
use. What is retried on the fresh connection:
- a transaction whose BEGIN failed (nothing of it reached the server), always;
- a read outside a transaction, once;
- a transaction that failed later (its outcome is unknown), once, only through
  `run(..., idempotent=True)` (e.g. the ledger's inserts: ON CONFLICT DO NOTHING by request
  id); anything else propagates the error.

The PostgreSQL URL may hold a password: it is never logged nor put into an error; `location`
and `repr()` show it redacted, and connection errors are re-raised scrubbed.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

logger = logging.getLogger("llmstack.database")

Dialect = Literal["sqlite", "postgresql"]
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
T = TypeVar("T")


@dataclass(frozen=True)
class Dialects:
    """A statement that differs per backend."""

    sqlite: str
    postgresql: str

    def pick(self, dialect: Dialect) -> str:
        return self.sqlite if dialect == "sqlite" else self.postgresql


SQL = str | Dialects
Params = Sequence[Any] | Mapping[str, Any]


class DatabaseError(Exception):
    """The database could not be reached (the message never holds a password)."""


def is_postgres_url(target: object) -> bool:
    return isinstance(target, str) and target.startswith(POSTGRES_SCHEMES)


def redact(url: str) -> str:
    """The URL without its password (userinfo and `password=` query parameter)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable database URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostinfo}" if has_password else f"{user}@{hostinfo}"
    query = parts.query
    if query:
        pairs = [(k, "***" if k.lower() in ("password", "passfile") else v)
                 for k, v in parse_qsl(query, keep_blank_values=True)]
        query = urlencode(pairs, safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _secrets_of(url: str) -> list[str]:
    """Every spelling of the URL's password (and the URL itself) to scrub from messages."""
    found = [url]
    try:
        parts = urlsplit(url)
        if parts.password:
            found += [parts.password, unquote(parts.password), quote(unquote(parts.password))]
        found += [v for k, v in parse_qsl(parts.query) if k.lower() == "password" and v]
    except ValueError:
        pass
    return sorted({s for s in found if s}, key=len, reverse=True)


class Result:
    """What a statement returned: `rowcount` and its rows (dicts), read eagerly."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, rowcount: int, rows: list[dict[str, Any]]) -> None:
        self.rowcount = rowcount
        self.rows = rows

    def fetchone(self) -> dict[str, Any] | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[dict[str, Any]]:
        return self.rows

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)


@lru_cache(maxsize=512)
def _to_pyformat(sql: str) -> str:
    """`?` -> `%s` outside quoted text; a literal `%` becomes `%%`."""
    out: list[str] = []
    quote_char: str | None = None
    for char in sql:
        if quote_char:
            if char == quote_char:
                quote_char = None
            out.append("%%" if char == "%" else char)
        elif char in ("'", '"'):
            quote_char = char
            out.append(char)
        elif char == "?":
            out.append("%s")
        elif char == "%":
            out.append("%%")
        else:
            out.append(char)
    return "".join(out)


def _dict_row_sqlite(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
    return {column[0]: value for column, value in zip(cursor.description, row)}


def _sqlite_wal(connection: sqlite3.Connection) -> None:
    """Switch a file to WAL. Two processes opening a brand-new file at once can get
    SQLITE_BUSY here at once (a lock upgrade SQLite's busy handler does not wait for):
    try again for a few seconds."""
    deadline = time.monotonic() + 10
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class _ConnectionLost(Exception):
    """Internal: the PostgreSQL connection died under a statement."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class Transaction:
    """Statements inside one transaction (`Database.transaction` / `Database.run`)."""

    def __init__(self, db: "Database") -> None:
        self._db = db
        self.dialect = db.dialect

    def execute(self, sql: SQL, params: Params = ()) -> Result:
        return self._db._execute(sql, params)

    def executemany(self, sql: SQL, seq_of_params: Sequence[Params]) -> int:
        return self._db._executemany(sql, seq_of_params)

    def fetchall(self, sql: SQL, params: Params = ()) -> list[dict[str, Any]]:
        return self._db._execute(sql, params).rows

    def fetchone(self, sql: SQL, params: Params = ()) -> dict[str, Any] | None:
        return self._db._execute(sql, params).fetchone()

    def lock_exclusive(self, table: str) -> None:
        """Serialise writers of `table` until the transaction ends (readers go on).
        SQLite: BEGIN IMMEDIATE already holds the database's write lock."""
        if self.dialect == "postgresql":
            self._db._execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE", ())

    def advisory_lock(self, key: int) -> None:
        """A transaction-scoped lock on a number (PostgreSQL); SQLite: the write lock."""
        if self.dialect == "postgresql":
            self._db._execute("SELECT pg_advisory_xact_lock(?)", (key,))

    def table_exists(self, table: str) -> bool:
        if self.dialect == "sqlite":
            row = self.fetchone("SELECT COUNT(*) AS n FROM sqlite_master "
                                "WHERE type = 'table' AND name = ?", (table,))
        else:
            row = self.fetchone("SELECT COUNT(*) AS n FROM information_schema.tables "
                                "WHERE table_schema = current_schema() AND table_name = ?",
                                (table,))
        return bool(row and row["n"])

    def columns(self, table: str) -> set[str]:
        if self.dialect == "sqlite":
            return {row["name"] for row in self.fetchall(f"PRAGMA table_info({table})")}
        return {row["column_name"] for row in self.fetchall(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ?", (table,))}


class Database:
    """One connection to a SQLite file or a PostgreSQL database (`postgresql://` URL)."""

    def __init__(self, target: Path | str, *, name: str = "llmstack",
                 synchronous: str = "FULL", connect_timeout_s: float = 15.0) -> None:
        self.name = name
        self.lock = threading.RLock()
        self.connect_timeout_s = connect_timeout_s
        self._synchronous = synchronous
        self._in_transaction = False
        self.reconnects = 0
        if is_postgres_url(target):
            self.dialect: Dialect = "postgresql"
            self._url: str | None = str(target)
            self.path: Path | None = None
            self._secrets = _secrets_of(self._url)
        else:
            if isinstance(target, str) and "://" in target:
                raise ValueError("a database URL must start with postgresql:// "
                                 f"(got a {target.split('://', 1)[0]!r} URL)")
            self.dialect = "sqlite"
            self._url = None
            self.path = Path(target)
            self._secrets = []
        self._conn: Any = None
        self._conn = self._connect()

    # ------------------------------------------------------------------ identity
    @property
    def location(self) -> str:
        """Where the data lives, safe to log (a URL's password redacted)."""
        return redact(self._url) if self._url else str(self.path)

    def __repr__(self) -> str:
        return f"Database({self.dialect}, {self.location})"

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def sql(self, statement: SQL) -> str:
        text = statement.pick(self.dialect) if isinstance(statement, Dialects) else statement
        return _to_pyformat(text) if self.dialect == "postgresql" else text

    # ------------------------------------------------------------------ connections
    def _connect(self) -> Any:
        if self.dialect == "sqlite":
            assert self.path is not None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(str(self.path), timeout=30, isolation_level=None,
                                         check_same_thread=False)
            connection.row_factory = _dict_row_sqlite
            _sqlite_wal(connection)
            # FULL: a commit survives power loss; NORMAL survives a process crash.
            connection.execute(f"PRAGMA synchronous={self._synchronous}")
            connection.execute("PRAGMA foreign_keys=ON")
            connection.execute("PRAGMA busy_timeout=30000")
            return connection
        import psycopg
        from psycopg.rows import dict_row

        deadline = time.monotonic() + self.connect_timeout_s
        delay = 0.05
        while True:
            try:
                return psycopg.connect(
                    self._url, autocommit=True, row_factory=dict_row,
                    connect_timeout=max(1, int(min(5.0, self.connect_timeout_s))),
                    application_name=f"llmstack-{self.name}")
            except psycopg.Error as error:
                # Connecting runs nothing: retrying it (e.g. while the server restarts)
                # is always safe.
                message = self.scrub(str(error))
                if time.monotonic() + delay > deadline or not isinstance(
                        error, psycopg.OperationalError):
                    raise DatabaseError(f"cannot connect to the {self.name} database at "
                                        f"{self.location}: {message}") from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _usable(self) -> Any:
        if self.dialect == "postgresql" and (self._conn is None or self._conn.closed
                                             or self._conn.broken):
            self._reconnect()
        return self._conn

    def _reconnect(self) -> None:
        old, self._conn = self._conn, None
        if old is not None:
            try:
                old.close()
            except Exception:  # noqa: BLE001 - already dead
                pass
        logger.warning("%s database connection lost; reconnecting to %s",
                       self.name, self.location)
        self._conn = self._connect()
        self.reconnects += 1

    def _lost(self, error: BaseException) -> bool:
        if self.dialect != "postgresql":
            return False
        import psycopg

        conn = self._conn
        return isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)) and (
            conn is None or conn.closed or conn.broken)

    # ------------------------------------------------------------------ statements
    def _execute(self, sql: SQL, params: Params) -> Result:
        conn = self._usable()
        try:
            cursor = conn.execute(self.sql(sql), params)
        except Exception as error:
            if self._lost(error):
                raise _ConnectionLost(error) from error
            raise
        rows = cursor.fetchall() if cursor.description else []
        return Result(cursor.rowcount, rows)

    def _executemany(self, sql: SQL, seq_of_params: Sequence[Params]) -> int:
        conn = self._usable()
        try:
            if self.dialect == "sqlite":
                cursor = conn.executemany(self.sql(sql), seq_of_params)
            else:
                cursor = conn.cursor()
                cursor.executemany(self.sql(sql), seq_of_params)
        except Exception as error:
            if self._lost(error):
                raise _ConnectionLost(error) from error
            raise
        return cursor.rowcount

    def execute(self, sql: SQL, params: Params = ()) -> Result:
        """One statement on its own (autocommit); never retried. Writes that should survive
        a reconnect belong in `transaction()` / `run()`."""
        with self.lock:
            try:
                return self._execute(sql, params)
            except _ConnectionLost as lost:
                self._conn_dead()
                raise lost.error from None

    def fetchall(self, sql: SQL, params: Params = ()) -> list[dict[str, Any]]:
        """A read, retried once on a fresh connection if the connection died under it."""
        with self.lock:
            if self._in_transaction:
                return self._execute(sql, params).rows
            try:
                return self._execute(sql, params).rows
            except _ConnectionLost:
                self._reconnect()
            try:
                return self._execute(sql, params).rows
            except _ConnectionLost as lost:  # twice in a row: give up, say why
                self._conn_dead()
                raise lost.error from None

    def fetchone(self, sql: SQL, params: Params = ()) -> dict[str, Any] | None:
        rows = self.fetchall(sql, params)
        return rows[0] if rows else None

    def _conn_dead(self) -> None:
        """Drop the dead connection; the next use opens a new one."""
        old, self._conn = self._conn, None
        if old is not None:
            try:
                old.close()
            except Exception:  # noqa: BLE001
                pass

    # ------------------------------------------------------------------ transactions
    def _begin(self) -> None:
        statement = "BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN"
        try:
            self._execute(statement, ())
            return
        except _ConnectionLost:
            # Nothing of this transaction reached the server: a fresh connection is safe.
            self._reconnect()
        try:
            self._execute(statement, ())
        except _ConnectionLost as lost:
            self._conn_dead()
            raise lost.error from None

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """BEGIN ... COMMIT (ROLLBACK on an exception); the error propagates."""
        with self.lock:
            if self._in_transaction:
                raise RuntimeError("transactions do not nest")
            self._begin()
            self._in_transaction = True
            try:
                yield Transaction(self)
                self._execute("COMMIT", ())
            except _ConnectionLost as lost:
                self._conn_dead()
                _mark_lost(lost.error)
                raise lost.error from None
            except BaseException as error:
                if self._lost(error):
                    self._conn_dead()
                    _mark_lost(error)
                else:
                    try:
                        self._execute("ROLLBACK", ())
                    except _ConnectionLost:
                        self._conn_dead()
                raise
            finally:
                self._in_transaction = False

    def run(self, fn: Callable[[Transaction], T], *, idempotent: bool = False) -> T:
        """`fn(tx)` in a transaction. If the connection dies mid-transaction (its outcome
        unknown), an idempotent `fn` runs once more on a fresh connection; otherwise the
        error propagates."""
        with self.lock:
            try:
                with self.transaction() as tx:
                    return fn(tx)
            except Exception as error:
                if not (idempotent and getattr(error, _LOST_MARK, False)):
                    raise
                logger.warning("%s database connection lost mid-transaction; retrying the "
                               "idempotent write once on a new connection", self.name)
                self._reconnect()
                with self.transaction() as tx:
                    return fn(tx)

    def write(self, sql: SQL, params: Params = (), *, idempotent: bool = False) -> int:
        """One write statement in its own transaction; returns its rowcount."""
        return self.run(lambda tx: tx.execute(sql, params).rowcount, idempotent=idempotent)

    # ------------------------------------------------------------------ dialect helpers
    def round_sum(self, column: str, digits: int) -> str:
        """ROUND(SUM(column), digits) as a float on both backends (PostgreSQL rounds only
        NUMERIC)."""
        if self.dialect == "sqlite":
            return f"ROUND(SUM({column}), {int(digits)})"
        return (f"CAST(ROUND(CAST(SUM({column}) AS NUMERIC), {int(digits)}) "
                "AS DOUBLE PRECISION)")

    def bucket_start(self, column: str, interval_s: int) -> str:
        """The start of the `interval_s` bucket a non-negative epoch `column` falls in, as
        an integer (SQLite's integer division floors; PostgreSQL's CAST would round)."""
        n = int(interval_s)
        if self.dialect == "sqlite":
            return f"((CAST({column} AS INTEGER) / {n}) * {n})"
        return f"(CAST(FLOOR({column} / {n}) AS BIGINT) * {n})"

    def close(self) -> None:
        with self.lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


_LOST_MARK = "llmstack_connection_lost"


def _mark_lost(error: BaseException) -> None:
    """Tag an error raised because the connection died (the transaction's outcome is
    unknown), so `run` can tell it from any other OperationalError."""
    try:
        setattr(error, _LOST_MARK, True)
    except AttributeError:  # pragma: no cover
        pass


Target = Path | str | Database


def open_database(target: Target, *, name: str, synchronous: str = "FULL"
                  ) -> tuple[Database, bool]:
    """(database, owned): a `Database` passed in is shared (its owner closes it)."""
    if isinstance(target, Database):
        return target, False
    return Database(target, name=name, synchronous=synchronous), True


IntegrityErrors: tuple[type[BaseException], ...]
try:
    import psycopg as _psycopg

    IntegrityErrors = (sqlite3.IntegrityError, _psycopg.IntegrityError)
except ImportError:  # pragma: no cover
    IntegrityErrors = (sqlite3.IntegrityError,)
