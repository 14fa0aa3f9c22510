"""Which Quota shard owns a key: a stable hash of the key id.

Each shard is its own single-replica deployment that owns the limit windows, budget
reservations and key cache of its keys, so "a limit of N means N" holds with any number of
gateways while admission throughput grows with the number of shards. Everything about a
key (admit, extend, settle, admin edits) goes to its owner; reads over many keys (lists,
usage reports) go to any shard, which reads the shared database.
"""
from __future__ import annotations

import zlib

from serve_app.accounts.keys import parse_key_id


def shard_of(key_id: str, shards: int) -> int:
    """Stable across processes and restarts (never Python's salted hash())."""
    if shards <= 1:
        return 0
    return zlib.crc32(key_id.encode()) % shards


def shard_of_token(token: str | None, shards: int) -> int:
    """The owner of the key a bearer token names. A token that names no key (malformed,
    absent) fails authentication on any shard; it is spread by its own hash so a flood of
    bad tokens does not land on one shard."""
    key_id = parse_key_id(token or "")
    return shard_of(key_id if key_id is not None else (token or ""), shards)
