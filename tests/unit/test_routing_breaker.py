"""Circuit breaker state machine, driven by an injected clock."""
from __future__ import annotations

import pytest

from serve_app.routing.circuit_breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_opens_after_n_consecutive_failures(clock):
    breaker = CircuitBreaker(failure_threshold=3, reset_s=10, clock=clock)
    for _ in range(2):
        breaker.record_failure()
        assert breaker.state is BreakerState.CLOSED and breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retry_in() == pytest.approx(10)


def test_a_success_resets_the_failure_count(clock):
    breaker = CircuitBreaker(failure_threshold=3, reset_s=10, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED


def test_half_open_lets_exactly_one_probe_through(clock):
    breaker = CircuitBreaker(failure_threshold=1, reset_s=10, clock=clock)
    breaker.record_failure()
    clock.advance(9.9)
    assert not breaker.allow()
    clock.advance(0.2)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()          # the probe
    assert not breaker.allow()      # everyone else waits for its verdict


def test_probe_success_closes(clock):
    breaker = CircuitBreaker(failure_threshold=2, reset_s=5, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.advance(5)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow() and breaker.allow()
    assert breaker.consecutive_failures == 0


def test_probe_failure_reopens_for_a_full_period(clock):
    breaker = CircuitBreaker(failure_threshold=2, reset_s=5, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.advance(6)
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.advance(4.9)
    assert not breaker.allow()
    clock.advance(0.2)
    assert breaker.allow()


def test_a_lost_probe_is_replaced_after_reset_s(clock):
    breaker = CircuitBreaker(failure_threshold=1, reset_s=5, clock=clock)
    breaker.record_failure()
    clock.advance(5)
    assert breaker.allow()
    clock.advance(4)
    assert not breaker.allow()
    clock.advance(1)
    assert breaker.allow()   # the first probe never reported back


def test_snapshot_and_validation(clock):
    breaker = CircuitBreaker(failure_threshold=1, reset_s=5, clock=clock)
    breaker.record_failure()
    assert breaker.snapshot() == {"state": "open", "consecutive_failures": 1, "retry_in_s": 5.0}
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0, reset_s=1)
