"""Secrets from environment variables, or generated once into <data_dir>/secrets (0600)."""
from __future__ import annotations

import os
import secrets
import time
from pathlib import Path


def env_or_generated(env_name: str, data_dir: Path, filename: str) -> str:
    value = os.environ.get(env_name)
    if value:
        return value
    directory = data_dir / "secrets"
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    path = directory / filename
    try:
        # O_EXCL: two replicas starting at once cannot both write different secrets.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(100):  # the creator may still be writing it
            value = path.read_text().strip()
            if value:
                return value
            time.sleep(0.05)
        raise RuntimeError(f"{path} is empty; delete it to generate a new secret")
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


def admin_key_path(data_dir: Path) -> Path:
    return data_dir / "secrets" / "admin.key"
