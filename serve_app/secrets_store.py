"""Secrets from environment variables, or generated once into <data_dir>/secrets (0600).

    python -m serve_app.secrets_store ray-auth-token [--data-dir var]

creates Ray's control-plane token if it is missing and prints its path (never the token),
e.g. before `ray up cluster.yaml` copies it to the nodes.
"""
from __future__ import annotations

import argparse
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

RAY_AUTH_TOKEN_FILE = "ray_auth_token"


def env_or_generated(env_name: str, data_dir: Path, filename: str) -> str:
    value = os.environ.get(env_name)
    if value:
        return value
    return read_or_create(data_dir / "secrets" / filename)


def read_or_create(path: Path,
                   generate: Callable[[], str] = lambda: secrets.token_urlsafe(32)) -> str:
    """The secret in `path`, generated first (mode 0600, directory 0700) if it is missing."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    try:
        # O_EXCL: two processes starting at once cannot both write different secrets.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(100):  # the creator may still be writing it
            value = path.read_text().strip()
            if value:
                return value
            time.sleep(0.05)
        raise RuntimeError(f"{path} is empty; delete it to generate a new secret")
    with os.fdopen(fd, "w") as handle:
        handle.write(generate() + "\n")
    return path.read_text().strip()


def admin_key_path(data_dir: Path) -> Path:
    return data_dir / "secrets" / "admin.key"


def ray_auth_token_path(data_dir: Path) -> Path:
    return data_dir / "secrets" / RAY_AUTH_TOKEN_FILE


def ensure_ray_auth_token(data_dir: Path) -> Path:
    """Create Ray's token once under the data dir; returns the file (for RAY_AUTH_TOKEN_PATH).

    Ray's own fallback (`ray get-auth-token --generate`, or ray.init in token mode without a
    token) writes ~/.ray/auth_token with the default umask, readable by every local user."""
    path = ray_auth_token_path(data_dir)
    read_or_create_ray_auth_token(path)
    return path


def read_or_create_ray_auth_token(path: Path) -> str:
    # 256 bits in hex, the format Ray generates itself: it travels as an HTTP header and
    # as gRPC metadata, where no character needs escaping.
    return read_or_create(path, lambda: secrets.token_hex(32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["ray-auth-token"])
    parser.add_argument("--data-dir", type=Path, default=Path("var"))
    args = parser.parse_args()
    print(ensure_ray_auth_token(args.data_dir.resolve()))


if __name__ == "__main__":
    main()
