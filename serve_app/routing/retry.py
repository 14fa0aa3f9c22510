"""Retries with exponential backoff and full jitter, for retryable upstream errors only
(connection errors, timeouts, 408, 429, 5xx; never another 4xx), honouring Retry-After.

Delay before retry k (k = 1, 2, ...): uniform(0, min(backoff_max_s, backoff_base_s * 2^(k-1)))
("full jitter"), but at least the provider's Retry-After. A Retry-After above
retry_after_cap_s is not waited for: the error is raised at once so the fallback chain can
move on to the next target instead of holding the request.
"""
from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from serve_app.routing.config import RetrySettings
from serve_app.routing.errors import UpstreamError

T = TypeVar("T")


def parse_retry_after(headers: Mapping[str, str] | None,
                      now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI) or `Retry-After` (seconds or an
    HTTP date); None when absent or unparsable; never negative."""
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    millis = lowered.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now())


def backoff_delay(attempt: int, settings: RetrySettings,
                  rng: Callable[[], float] = random.random) -> float:
    """Full-jitter exponential backoff before retry number `attempt` (1-based)."""
    ceiling = min(settings.backoff_max_s, settings.backoff_base_s * (2 ** max(0, attempt - 1)))
    return ceiling * rng()


@dataclass
class RetryDecision:
    retry: bool
    delay_s: float = 0.0
    reason: str = ""


def decide(error: UpstreamError, attempt: int, settings: RetrySettings,
           rng: Callable[[], float] = random.random) -> RetryDecision:
    """Whether to retry after `attempt` failed attempts (1-based), and how long to wait."""
    if not error.retryable:
        return RetryDecision(False, reason=f"{error.kind} is not retryable")
    if attempt > settings.max_retries:
        return RetryDecision(False, reason="retries exhausted")
    delay = backoff_delay(attempt, settings, rng)
    if error.retry_after is not None:
        if error.retry_after > settings.retry_after_cap_s:
            return RetryDecision(False, reason=f"Retry-After {error.retry_after:.1f}s exceeds "
                                 f"the {settings.retry_after_cap_s:.1f}s cap")
        delay = max(delay, error.retry_after)
    return RetryDecision(True, delay_s=delay)


async def call_with_retries(
    call: Callable[[], Awaitable[T]],
    settings: RetrySettings,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: Callable[[], float] = random.random,
    on_retry: Callable[[UpstreamError, int, float], None] | None = None,
    may_retry: Callable[[], bool] = lambda: True,
) -> T:
    """Run `call` until it succeeds, raises a non-retryable UpstreamError, or the retries
    are spent (then the last error is raised). `may_retry` is asked before each retry (a
    circuit breaker's permission). Anything not an UpstreamError propagates."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except UpstreamError as error:
            decision = decide(error, attempt, settings, rng)
            if not decision.retry or not may_retry():
                raise
            if on_retry is not None:
                on_retry(error, attempt, decision.delay_s)
            await sleep(decision.delay_s)
