"""API key material: generation with a CSPRNG, storage as a keyed hash only, constant-time
comparison. A key looks like `sk-<key id>_<secret>`; the key id is public (logs, admin API,
lookups), the secret never leaves the response that created it."""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from serve_app import textmatch

KEY_PREFIX = "sk-"
_KEY_RE = textmatch.compile(  # a client header
    r"^sk-([A-Za-z0-9]{12})_([A-Za-z0-9_-]{32,128})$")
# What generate_key draws key ids from (no 0/O, 1/I/l look-alikes): 12 characters.
KEY_ID_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789"
KEY_ID_LENGTH = 12
_KEY_ID_RE = textmatch.compile(
    r"[ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789]{12}")


@dataclass(frozen=True)
class NewKey:
    key_id: str
    secret: str  # the full key, shown once
    key_hash: str


def hash_key(full_key: str, pepper: bytes) -> str:
    """HMAC-SHA256 with a server-side pepper: keys are 256-bit random, so a fast keyed hash
    is the right tool (a slow password hash would only slow every request)."""
    return hmac.new(pepper, full_key.encode(), hashlib.sha256).hexdigest()


def new_key_id() -> str:
    """A fresh public key id (its hash picks the Quota shard that owns the key)."""
    return "".join(secrets.choice(KEY_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))


def generate_key(pepper: bytes, key_id: str | None = None) -> NewKey:
    """A new key; with `key_id`, a new secret for an existing key (rotation) or a key
    whose id the caller chose."""
    key_id = key_id or new_key_id()
    full = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    return NewKey(key_id=key_id, secret=full, key_hash=hash_key(full, pepper))


def is_valid_key_id(key_id: object) -> bool:
    """A key id generate_key could have drawn (what a caller-chosen id must look like)."""
    return isinstance(key_id, str) and _KEY_ID_RE.fullmatch(key_id) is not None


def parse_key_id(full_key: str) -> str | None:
    match = _KEY_RE.match(full_key or "")
    return match.group(1) if match else None


def hashes_match(full_key: str, stored_hash: str | None, pepper: bytes) -> bool:
    if not stored_hash:
        return False
    return hmac.compare_digest(hash_key(full_key, pepper), stored_hash)


def bearer_token(authorization: str | None, x_api_key: str | None = None) -> str | None:
    """`Authorization: Bearer <key>` (OpenAI SDK) or `x-api-key: <key>`."""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None
