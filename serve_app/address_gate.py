"""Per-address limits for traffic that carries no valid key (pure, no Ray).

Requests that end unauthenticated (401) are counted per client address. Past
`per_minute` of them in the window, the address's requests are refused with 429 at the
edge, before they cost the Quota service anything, unless they present a key that
authenticated recently on this replica (so a legitimate client behind the same NAT as an
attacker keeps working). Revocation is unaffected: a key that passes the gate is still
authenticated by the Quota service on every request.
Memory is bounded: at most `max_addresses` addresses and `max_keys` known-good keys (LRU).
"""
from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable


def key_fingerprint(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8", "replace")).hexdigest()


class AddressGate:
    def __init__(self, per_minute: int, *, window_s: float = 60.0, max_addresses: int = 10_000,
                 max_keys: int = 10_000, key_ttl_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.window_s = window_s
        self.max_addresses = max_addresses
        self.max_keys = max_keys
        self.key_ttl_s = key_ttl_s
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._good_keys: OrderedDict[str, float] = OrderedDict()

    def retry_after(self, address: str, api_key: str | None) -> int | None:
        """Seconds to wait if this request must be refused now, else None."""
        now = self.clock()
        if api_key and self._known_good(key_fingerprint(api_key), now):
            return None
        failures = self._failures.get(address)
        if failures is None:
            return None
        self._expire(failures, now)
        if len(failures) < self.per_minute:
            return None
        return max(1, math.ceil(failures[0] + self.window_s - now))

    def record(self, address: str, api_key: str | None, *, authenticated: bool,
               unauthenticated: bool) -> None:
        now = self.clock()
        if authenticated and api_key:
            fingerprint = key_fingerprint(api_key)
            self._good_keys[fingerprint] = now + self.key_ttl_s
            self._good_keys.move_to_end(fingerprint)
            while len(self._good_keys) > self.max_keys:
                self._good_keys.popitem(last=False)
        if not unauthenticated:
            return
        failures = self._failures.get(address)
        if failures is None:
            failures = self._failures[address] = deque()
            while len(self._failures) > self.max_addresses:
                self._failures.popitem(last=False)
        self._failures.move_to_end(address)
        self._expire(failures, now)
        failures.append(now)
        while len(failures) > self.per_minute:  # only the newest `per_minute` matter
            failures.popleft()

    def _known_good(self, fingerprint: str, now: float) -> bool:
        expires = self._good_keys.get(fingerprint)
        if expires is None:
            return False
        if expires <= now:
            del self._good_keys[fingerprint]
            return False
        return True

    def _expire(self, failures: deque[float], now: float) -> None:
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
