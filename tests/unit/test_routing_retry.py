"""Retry classification, backoff with jitter, Retry-After handling."""
from __future__ import annotations

import email.utils

import pytest

from serve_app.routing.config import RetrySettings
from serve_app.routing.errors import UpstreamError, is_retryable_status
from serve_app.routing.retry import (
    backoff_delay,
    call_with_retries,
    decide,
    parse_retry_after,
)

SETTINGS = RetrySettings(max_retries=3, backoff_base_s=0.5, backoff_max_s=2.0,
                         retry_after_cap_s=10.0)


@pytest.mark.parametrize("status,retryable", [
    (500, True), (502, True), (503, True), (504, True), (429, True), (408, True),
    (400, False), (401, False), (403, False), (404, False), (409, False), (422, False),
])
def test_only_5xx_408_429_are_retryable(status, retryable):
    assert is_retryable_status(status) is retryable
    assert UpstreamError.from_status(status, "x").retryable is retryable


@pytest.mark.parametrize("status,kind,fallback", [
    (429, "rate_limited", True), (503, "server", True), (401, "auth", True),
    (404, "not_found", True), (400, "bad_request", False), (422, "bad_request", False),
])
def test_status_kinds_and_fallback(status, kind, fallback):
    error = UpstreamError.from_status(status, "x")
    assert error.kind == kind and error.fallback is fallback


def test_hop_names():
    assert UpstreamError.from_status(503, "x").hop == "503"
    assert UpstreamError.from_status(429, "x").hop == "429"
    assert UpstreamError("timeout", "x").hop == "timeout"
    assert UpstreamError("connect", "x").hop == "connect"


def test_parse_retry_after_forms():
    assert parse_retry_after({"Retry-After": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "-4"}) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None
    assert parse_retry_after(None) is None
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=lambda: 1_000_000.0) == \
        pytest.approx(30.0)


def test_backoff_grows_exponentially_capped_with_full_jitter():
    top = [backoff_delay(k, SETTINGS, rng=lambda: 1.0) for k in (1, 2, 3, 4, 5)]
    assert top == [0.5, 1.0, 2.0, 2.0, 2.0]
    assert backoff_delay(3, SETTINGS, rng=lambda: 0.25) == 0.5
    assert backoff_delay(3, SETTINGS, rng=lambda: 0.0) == 0.0


def test_decide_never_retries_request_errors():
    assert not decide(UpstreamError.from_status(400, "bad"), 1, SETTINGS).retry
    assert not decide(UpstreamError.from_status(401, "key"), 1, SETTINGS).retry
    assert decide(UpstreamError("connect", "x"), 1, SETTINGS).retry
    assert not decide(UpstreamError("connect", "x"), 4, SETTINGS).retry  # 3 retries spent


def test_retry_after_is_honoured_up_to_the_cap():
    error = UpstreamError.from_status(429, "slow down", retry_after=4.0)
    decision = decide(error, 1, SETTINGS, rng=lambda: 0.1)
    assert decision.retry and decision.delay_s == 4.0
    too_long = UpstreamError.from_status(429, "slow down", retry_after=60.0)
    decision = decide(too_long, 1, SETTINGS)
    assert not decision.retry and "cap" in decision.reason


async def test_call_with_retries_sleeps_and_succeeds():
    slept: list[float] = []
    outcomes = [UpstreamError.from_status(503, "down"),
                UpstreamError.from_status(429, "wait", retry_after=1.5), "ok"]

    async def call():
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    assert await call_with_retries(call, SETTINGS, sleep=sleep, rng=lambda: 1.0) == "ok"
    assert slept == [0.5, 1.5]


async def test_call_with_retries_gives_up_and_raises_the_last_error():
    calls = 0

    async def call():
        nonlocal calls
        calls += 1
        raise UpstreamError("timeout", f"attempt {calls}")

    async def sleep(seconds: float) -> None:
        return None

    with pytest.raises(UpstreamError, match="attempt 4"):
        await call_with_retries(call, SETTINGS, sleep=sleep)
    assert calls == 4


async def test_call_with_retries_stops_when_not_permitted():
    calls = 0

    async def call():
        nonlocal calls
        calls += 1
        raise UpstreamError("server", "down", status=500)

    async def sleep(seconds: float) -> None:
        return None

    with pytest.raises(UpstreamError):
        await call_with_retries(call, SETTINGS, sleep=sleep, may_retry=lambda: False)
    assert calls == 1


async def test_a_bad_request_is_tried_once():
    calls = 0

    async def call():
        nonlocal calls
        calls += 1
        raise UpstreamError.from_status(400, "context too long")

    with pytest.raises(UpstreamError):
        await call_with_retries(call, SETTINGS)
    assert calls == 1
