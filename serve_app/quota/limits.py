"""Sliding-window rate limits (pure). A window holds weighted events of the last
`window_s` seconds: weight 1 per request for RPM, tokens for TPM. The check is exact:
a burst gets exactly `limit` admissions, and capacity comes back as events age out."""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass
class _Event:
    at: float
    weight: float
    token: str | None  # None: not settled later (rebuilt from the ledger)


class SlidingWindow:
    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self.events: deque[_Event] = deque()
        self._by_token: dict[str, _Event] = {}  # O(1) settlement, whatever the traffic
        self._total = 0.0

    def _expire(self, now: float) -> None:
        while self.events and self.events[0].at <= now - self.window_s:
            event = self.events.popleft()
            self._total -= event.weight
            if event.token is not None and self._by_token.get(event.token) is event:
                del self._by_token[event.token]

    def total(self, now: float) -> float:
        self._expire(now)
        return self._total

    def fits(self, now: float, weight: float, limit: float) -> bool:
        return self.total(now) + weight <= limit

    def retry_after(self, now: float, weight: float, limit: float) -> float:
        """Seconds until `weight` more fits (inf if it never can)."""
        if weight > limit:
            return math.inf
        self._expire(now)
        excess = self._total + weight - limit
        if excess <= 0:
            return 0.0
        freed = 0.0
        for event in self.events:
            freed += event.weight
            if freed >= excess:
                return max(0.0, event.at + self.window_s - now)
        return self.window_s

    def add(self, now: float, weight: float, token: str | None) -> None:
        """Events arrive in time order (one clock, one owner), which keeps expiry O(1)."""
        event = _Event(now, weight, token)
        self.events.append(event)
        if token is not None:
            self._by_token[token] = event
        self._total += weight

    def weight_of(self, token: str) -> float | None:
        event = self._by_token.get(token)
        return None if event is None else event.weight

    def adjust(self, token: str, weight: float) -> None:
        """Replace an estimate with the real weight (settlement); no-op once aged out."""
        event = self._by_token.get(token)
        if event is not None:
            self._total += weight - event.weight
            event.weight = weight


class KeyLimiter:
    """RPM and TPM windows of one key."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.requests = SlidingWindow(window_s)
        self.tokens = SlidingWindow(window_s)

    def check(self, now: float, rpm: int | None, tpm: int | None,
              tokens: int) -> tuple[str, float] | None:
        """None if the request fits, else (which limit, retry-after seconds)."""
        if rpm is not None and not self.requests.fits(now, 1, rpm):
            return "rpm", self.requests.retry_after(now, 1, rpm)
        if tpm is not None and not self.tokens.fits(now, tokens, tpm):
            return "tpm", self.tokens.retry_after(now, tokens, tpm)
        return None

    def add(self, now: float, tokens: int, token: str | None, requests: int = 1) -> None:
        self.requests.add(now, requests, token)
        self.tokens.add(now, tokens, token)

    def settle(self, token: str, actual_tokens: int) -> None:
        self.tokens.adjust(token, actual_tokens)

    def try_extend(self, now: float, tpm: int | None, token: str, extra: int) -> bool:
        """Add `extra` tokens to a reservation still in the window, if they fit the TPM."""
        if extra <= 0:
            return True
        if tpm is not None and not self.tokens.fits(now, extra, tpm):
            return False
        current = self.tokens.weight_of(token)
        if current is None:  # aged out already: book it as a fresh event
            self.tokens.add(now, extra, token)
        else:
            self.tokens.adjust(token, current + extra)
        return True
