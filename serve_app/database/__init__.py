"""The relational stores' database layer: SQLite (embedded default) or PostgreSQL."""
from serve_app.database.core import (
    SQL,
    Database,
    DatabaseError,
    Dialects,
    IntegrityErrors,
    Result,
    Target,
    Transaction,
    is_postgres_url,
    open_database,
    redact,
)
from serve_app.database.migrate import applied_versions, legacy_schema_version, migrate

__all__ = ["SQL", "Database", "DatabaseError", "Dialects", "IntegrityErrors", "Result",
           "Target", "Transaction", "applied_versions", "is_postgres_url",
           "legacy_schema_version", "migrate", "open_database", "redact"]
