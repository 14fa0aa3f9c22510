"""Which database the stores use: SQLite files under data_dir, or one PostgreSQL database."""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from serve_app.database.core import is_postgres_url


class DatabaseSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)

    url_env: str = Field(
        "LLMSTACK_DATABASE_URL", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding a postgresql:// URL (a secret: it may "
        "hold a password, so it is never a setting and never logged). Set: the accounts "
        "store, usage ledger, agent sessions and audit log all live in that one PostgreSQL "
        "database (several Quota shards / AgentRunner replicas share it). Unset or empty: "
        "each uses its SQLite file under data_dir (accounts.db, usage.db, "
        "agent/sessions.sqlite3, agent/audit.sqlite3).")
    require_url: bool = Field(
        False, description="Refuse to start when the variable is unset (clusters: replicas "
        "on several nodes must share PostgreSQL, never open SQLite files of their own).")

    def url(self) -> str | None:
        """The PostgreSQL URL from the environment, or None (SQLite)."""
        value = os.environ.get(self.url_env, "").strip()
        if not value:
            if self.require_url:
                raise ValueError(f"${self.url_env} is not set: this deployment stores its "
                                 "data in PostgreSQL (database.require_url)")
            return None
        if not is_postgres_url(value):
            # Never echo the value: it may be a password pasted into the wrong variable.
            raise ValueError(f"${self.url_env} must be a postgresql:// URL")
        return value

    def target(self, sqlite_path: Path) -> Path | str:
        """Where a store lives: the PostgreSQL URL if one is configured, else its file."""
        return self.url() or sqlite_path
