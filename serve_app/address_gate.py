"""Per-address limits for traffic that carries no known-good key (pure, no Ray).

Every request from an address whose key has not authenticated recently on this replica
takes a slot in the address's window before it may cost the Quota service anything; past
`per_minute` slots the address gets 429 at the edge. A slot is given back when its request
turns out authenticated (and its key becomes known-good, so later requests with it skip
the gate: a legitimate client behind the same NAT as an attacker keeps working). Slots are
taken when the request starts, so a concurrent burst is cut exactly, not after the fact.
Revocation is unaffected: a key that skips the gate is still authenticated by the Quota
service on every request. Memory is bounded: at most `max_addresses` addresses (each at
most `per_minute` timestamps) and `max_keys` known-good key fingerprints (LRU).
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
        self._slots: OrderedDict[str, deque[float]] = OrderedDict()
        self._good_keys: OrderedDict[str, float] = OrderedDict()

    def enter(self, address: str, api_key: str | None) -> tuple[int | None, float | None]:
        """(seconds to wait if refused now, else None; the slot taken, if any)."""
        now = self.clock()
        if api_key and self._known_good(key_fingerprint(api_key), now):
            return None, None
        slots = self._slots.get(address)
        if slots is None:
            slots = self._slots[address] = deque()
            while len(self._slots) > self.max_addresses:
                self._slots.popitem(last=False)
        self._slots.move_to_end(address)
        self._expire(slots, now)
        if len(slots) >= self.per_minute:
            return max(1, math.ceil(slots[0] + self.window_s - now)), None
        slots.append(now)
        return None, now

    def leave(self, address: str, api_key: str | None, slot: float | None, *,
              authenticated: bool, undecided: bool = False) -> None:
        """After the response: an authenticated request gives its slot back, and so does
        one whose key could not be checked (`undecided`: the Quota service was down or
        late, 503/504). An outage is no evidence against a key; counting it filled a
        busy address's window and turned the outage into 429s for valid keys."""
        if not authenticated and not undecided:
            return
        if authenticated and api_key:
            fingerprint = key_fingerprint(api_key)
            self._good_keys[fingerprint] = self.clock() + self.key_ttl_s
            self._good_keys.move_to_end(fingerprint)
            while len(self._good_keys) > self.max_keys:
                self._good_keys.popitem(last=False)
        slots = self._slots.get(address)
        if slot is not None and slots is not None:
            try:
                slots.remove(slot)
            except ValueError:  # aged out already
                pass

    def _known_good(self, fingerprint: str, now: float) -> bool:
        expires = self._good_keys.get(fingerprint)
        if expires is None:
            return False
        if expires <= now:
            del self._good_keys[fingerprint]
            return False
        return True

    def _expire(self, slots: deque[float], now: float) -> None:
        while slots and slots[0] <= now - self.window_s:
            slots.popleft()
