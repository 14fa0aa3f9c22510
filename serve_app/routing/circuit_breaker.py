"""Circuit breaker per provider: closed -> open after N consecutive failures -> half-open
(one probe) after reset_s -> closed on the probe's success, open again on its failure.

Pure state machine with an injectable clock; not thread-safe by design (one asyncio loop
per replica owns it). Each replica keeps its own breakers: a cluster-wide breaker would
cost a remote call per request and the local view converges within N failures anyway.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, failure_threshold: int, reset_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1 or reset_s <= 0:
            raise ValueError("failure_threshold >= 1 and reset_s > 0 are required")
        self.failure_threshold = failure_threshold
        self.reset_s = reset_s
        self.clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_started: float | None = None

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self.clock() - self._opened_at >= self.reset_s:
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def allow(self) -> bool:
        """May a call go out now? In half-open exactly one probe is let through at a time
        (a probe that never reports back is presumed lost after reset_s)."""
        now = self.clock()
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        if self._probe_started is not None and now - self._probe_started < self.reset_s:
            return False
        self._state = BreakerState.HALF_OPEN
        self._probe_started = now
        return True

    def retry_in(self) -> float:
        """Seconds until the next probe may go out (0 when calls are allowed)."""
        if self._state is BreakerState.CLOSED:
            return 0.0
        since = self._probe_started if self._probe_started is not None else self._opened_at
        return max(0.0, self.reset_s - (self.clock() - since))

    def record_success(self) -> None:
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._probe_started = None

    def record_failure(self) -> None:
        if self.state is BreakerState.HALF_OPEN or self._state is BreakerState.HALF_OPEN:
            self._trip()
            return
        self._failures += 1
        if self._state is BreakerState.CLOSED and self._failures >= self.failure_threshold:
            self._trip()

    def _trip(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self.clock()
        self._probe_started = None

    def snapshot(self) -> dict[str, object]:
        return {"state": self.state.value, "consecutive_failures": self._failures,
                "retry_in_s": round(self.retry_in(), 3)}
