"""Live load and health signals for routing (pure; the gateway feeds them).

- `LocalLoad`: how busy the local vLLM target is: this gateway's own requests in flight to
  it, and the running count its engine last reported (polled at most every `poll_s`, in
  the background, never on the request path). Above `max_running` the local target is
  skipped with reason `overloaded` and the request spills to the next target of its chain;
  when the load falls back, traffic returns.
- `ProviderHealth`: providers that just answered 429 or had an open breaker are moved
  behind the local target for a while (their Retry-After, or `cooldown_s`), so the chain
  prefers local capacity instead of hammering a provider that said no.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)


class LocalLoad:
    def __init__(self, max_running: int | None, *, poll: Callable[[], Awaitable[int]] | None = None,
                 poll_s: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_running = max_running
        self.poll = poll
        self.poll_s = poll_s
        self.clock = clock
        self.in_flight = 0
        self.engine_running = 0
        self._polled_at = -float("inf")
        self._polling: asyncio.Task[None] | None = None

    def started(self) -> None:
        self.in_flight += 1

    def finished(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    def running(self) -> int:
        return max(self.in_flight, self.engine_running)

    def skip_reason(self) -> str | None:
        """The local target's skip reason for the fallback walker."""
        if self.max_running is None:
            return None
        self._maybe_poll()
        return "overloaded" if self.running() >= self.max_running else None

    def _maybe_poll(self) -> None:
        if self.poll is None or self.clock() - self._polled_at < self.poll_s:
            return
        if self._polling is not None and not self._polling.done():
            return
        self._polled_at = self.clock()
        try:
            self._polling = asyncio.get_running_loop().create_task(self._poll_once())
        except RuntimeError:  # no loop (sync caller): keep the last value
            pass

    async def _poll_once(self) -> None:
        assert self.poll is not None
        try:
            self.engine_running = int(await self.poll())
        except Exception:  # a failed poll keeps the last value
            logger.debug("local load poll failed", exc_info=True)


class ProviderHealth:
    def __init__(self, cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._until: dict[str, float] = {}

    def refused(self, provider: str, retry_after_s: float | None = None) -> None:
        if self.cooldown_s <= 0:  # preference off: chains keep their order
            return
        wait = retry_after_s if retry_after_s and retry_after_s > 0 else self.cooldown_s
        self._until[provider] = self.clock() + min(wait, 10 * self.cooldown_s)

    def degraded(self, provider: str) -> bool:
        until = self._until.get(provider)
        if until is None:
            return False
        if until <= self.clock():
            del self._until[provider]
            return False
        return True

    def order(self, names: list[str], local: str) -> list[str]:
        """Degraded providers move behind the local target (never dropped)."""
        if local not in names:
            return names
        degraded = [n for n in names if n != local and self.degraded(n)]
        if not degraded:
            return names
        at = names.index(local)
        head = [n for n in names[:at] if n not in degraded]
        return head + [local] + degraded + [n for n in names[at + 1:] if n not in degraded]
