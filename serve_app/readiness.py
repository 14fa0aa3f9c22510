"""A readiness probe that is cheap to call (pure asyncio, no Ray).

Each real probe runs a generation; /readyz is unauthenticated, so its result is reused for
`ttl_s` and concurrent callers share the one probe in flight: a flood of probes costs at
most one generation per `ttl_s`.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

Probe = Callable[[], Awaitable[dict[str, Any]]]


class CachedReadiness:
    def __init__(self, probe: Probe, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.probe = probe
        self.ttl_s = ttl_s
        self.clock = clock
        self.probes_run = 0
        self._result: dict[str, Any] | None = None
        self._at = -float("inf")
        self._inflight: asyncio.Future[dict[str, Any]] | None = None

    async def check(self) -> dict[str, Any]:
        """{"ready": bool, ...}: the last result if fresh, else one shared new probe."""
        if self._result is not None and self.clock() - self._at < self.ttl_s:
            return self._result
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._run())
        # shield: one caller going away must not cancel the probe the others wait on
        return await asyncio.shield(self._inflight)

    async def _run(self) -> dict[str, Any]:
        self.probes_run += 1
        try:
            result = await self.probe()
        except Exception as exc:  # a failed probe is "not ready", never an exception
            result = {"ready": False, "reason": type(exc).__name__}
        self._result, self._at = result, self.clock()
        return result
