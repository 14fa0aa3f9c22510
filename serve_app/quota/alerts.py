"""Budget alerts: each threshold fires once per key and period (persisted, so a restart
does not re-fire), to the log, a metric and an optional webhook that is retried in the
background and never blocks a request."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger("llmstack.alerts")


def crossed_thresholds(before: float, after: float, budget: float,
                       thresholds: Sequence[float]) -> list[float]:
    """Thresholds (fractions of the budget) that spending from `before` to `after` crossed."""
    if budget <= 0:
        return []
    return [t for t in sorted(thresholds) if before < t * budget <= after + 1e-12]


class WebhookNotifier:
    """POST JSON with retries and exponential backoff, as fire-and-forget tasks."""

    def __init__(self, *, attempts: int = 5, first_delay_s: float = 0.5, timeout_s: float = 5.0,
                 post: Callable[[str, dict[str, Any], float], Any] | None = None) -> None:
        self.attempts = attempts
        self.first_delay_s = first_delay_s
        self.timeout_s = timeout_s
        self._post = post or _httpx_post
        self.tasks: set[asyncio.Task[bool]] = set()

    def send(self, url: str, payload: dict[str, Any]) -> asyncio.Task[bool]:
        task = asyncio.create_task(self._deliver(url, payload))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _deliver(self, url: str, payload: dict[str, Any]) -> bool:
        delay = self.first_delay_s
        for attempt in range(1, self.attempts + 1):
            try:
                status = await self._post(url, payload, self.timeout_s)
                if 200 <= status < 300:
                    return True
                logger.warning("alert webhook answered %s (attempt %d)", status, attempt)
            except Exception as exc:  # network errors are retried
                logger.warning("alert webhook failed (attempt %d): %s", attempt,
                               type(exc).__name__)
            if attempt < self.attempts:
                await asyncio.sleep(delay)
                delay *= 2
        logger.error("alert webhook gave up after %d attempts: %s", self.attempts,
                     json.dumps({k: payload.get(k) for k in ("key_id", "threshold")}))
        return False


async def _httpx_post(url: str, payload: dict[str, Any], timeout_s: float) -> int:
    import httpx

    async with httpx.AsyncClient(timeout=timeout_s) as client:
        response = await client.post(url, json=payload)
        return response.status_code
