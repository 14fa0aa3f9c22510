import asyncio
import datetime as dt
import math

import pytest

from serve_app.quota.alerts import WebhookNotifier, crossed_thresholds
from serve_app.quota.budget import BudgetBook, period_bounds
from serve_app.quota.limits import KeyLimiter, SlidingWindow
from serve_app.quota.pricing import Price


def test_sliding_window_admits_exactly_the_limit_then_refills():
    window = SlidingWindow(60)
    admitted = 0
    for i in range(10):
        if window.fits(100.0, 1, 4):
            window.add(100.0, 1, f"r{i}")
            admitted += 1
    assert admitted == 4
    assert window.retry_after(100.0, 1, 4) == pytest.approx(60)
    assert not window.fits(159.9, 1, 4)
    assert window.fits(160.0, 1, 4)  # the first events aged out


def test_retry_after_counts_only_the_events_that_must_expire():
    window = SlidingWindow(60)
    window.add(0, 50, "a")
    window.add(30, 50, "b")
    assert window.retry_after(40, 30, 100) == pytest.approx(20)  # only "a" must go
    assert window.retry_after(40, 101, 100) == math.inf


def test_tpm_settlement_replaces_the_estimate():
    limiter = KeyLimiter(60)
    limiter.add(0, 900, "r1")
    assert limiter.check(1, None, 1000, 200) == ("tpm", pytest.approx(59))
    limiter.settle("r1", 100)
    assert limiter.check(1, None, 1000, 200) is None


def test_rpm_checked_before_tpm():
    limiter = KeyLimiter(60)
    limiter.add(0, 10, "r1")
    assert limiter.check(1, 1, 5, 10)[0] == "rpm"


def test_period_bounds_utc():
    now = dt.datetime(2026, 2, 14, 15, 30, tzinfo=dt.timezone.utc).timestamp()
    day = period_bounds("day", now)
    month = period_bounds("month", now)
    assert dt.datetime.fromtimestamp(day[0], dt.timezone.utc).hour == 0
    assert day[1] - day[0] == 86400
    assert dt.datetime.fromtimestamp(month[1], dt.timezone.utc) == dt.datetime(
        2026, 3, 1, tzinfo=dt.timezone.utc)


def test_budget_reservations_block_joint_overspend_and_settlement_refunds():
    book = BudgetBook(lambda key, since: 0.40)  # 0.40 already spent this period
    now = 1_000_000.0
    assert book.try_reserve("k", 1.0, "day", now, 0.25, "a")
    assert book.try_reserve("k", 1.0, "day", now, 0.25, "b")
    assert not book.try_reserve("k", 1.0, "day", now, 0.25, "c")  # 0.40+0.50+0.25 > 1
    before, after = book.settle("k", "day", now, "a", 0.05)  # used far less than reserved
    assert (before, after) == (pytest.approx(0.40), pytest.approx(0.45))
    assert book.remaining("k", 1.0, "day", now) == pytest.approx(0.30)
    assert book.try_reserve("k", 1.0, "day", now, 0.25, "c")


def test_budget_spend_is_reloaded_from_the_ledger_in_a_new_period():
    loads = []

    def load(key, since):
        loads.append(since)
        return 0.0 if len(loads) > 1 else 0.9

    book = BudgetBook(load)
    day1 = dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone.utc).timestamp()
    assert not book.try_reserve("k", 1.0, "day", day1, 0.2, "a")
    assert book.try_reserve("k", 1.0, "day", day1 + 86400, 0.2, "b")
    assert len(loads) == 2


def test_price():
    assert Price(input_per_mtok=2, output_per_mtok=10).cost(1000, 100) == pytest.approx(0.003)


@pytest.mark.parametrize("before,after,expected", [
    (0.0, 0.49, []), (0.0, 0.5, [0.5]), (0.45, 0.85, [0.5, 0.8]), (0.5, 0.79, []),
    (0.9, 1.2, [1.0])])
def test_crossed_thresholds(before, after, expected):
    assert crossed_thresholds(before, after, 1.0, [0.5, 0.8, 1.0]) == expected


def test_webhook_retries_until_success():
    calls = []

    async def post(url, payload, timeout):
        calls.append(payload)
        if len(calls) < 3:
            raise ConnectionError("down")
        return 200

    async def run():
        notifier = WebhookNotifier(attempts=5, first_delay_s=0.001, post=post)
        return await notifier.send("http://hook", {"threshold": 0.5})

    assert asyncio.run(run()) is True
    assert len(calls) == 3


def test_webhook_gives_up_after_attempts():
    async def post(url, payload, timeout):
        return 500

    async def run():
        return await WebhookNotifier(attempts=2, first_delay_s=0.001, post=post).send("u", {})

    assert asyncio.run(run()) is False
