"""USD budgets per key and period, reserved before the model is called (pure).

spent (settled, from the ledger) + reserved (in flight) + this request's worst case must
stay within the budget; settlement replaces the reservation with the real cost, so the
unused part is refunded. Concurrent requests cannot jointly overspend because each
reservation counts against the others."""
from __future__ import annotations

import calendar
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

UTC = dt.timezone.utc


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """[start, end) of the UTC day or month that contains `now`."""
    moment = dt.datetime.fromtimestamp(now, UTC)
    if period == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(days=1)
    elif period == "month":
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        days = calendar.monthrange(start.year, start.month)[1]
        end = start + dt.timedelta(days=days)
    else:
        raise ValueError(f"unknown budget period {period!r}")
    return start.timestamp(), end.timestamp()


@dataclass
class _KeyBudget:
    """Reservations in flight and their running total (O(1) per admission)."""
    period_start: float
    spent: float
    reservations: dict[str, float] = field(default_factory=dict)
    reserved: float = 0.0

    def __post_init__(self) -> None:
        self.reserved = sum(self.reservations.values())

    def hold(self, reservation_id: str, amount: float) -> None:
        self.reserved += amount - self.reservations.get(reservation_id, 0.0)
        self.reservations[reservation_id] = amount

    def drop(self, reservation_id: str) -> None:
        amount = self.reservations.pop(reservation_id, None)
        if amount is not None:
            self.reserved -= amount
            if not self.reservations:
                self.reserved = 0.0  # no float drift survives an idle moment


class BudgetBook:
    def __init__(self, load_spent: Callable[[str, float], float]) -> None:
        """load_spent(key_id, since) -> settled USD since that time (from the ledger)."""
        self.load_spent = load_spent
        self.keys: dict[str, _KeyBudget] = {}

    def _state(self, key_id: str, period: str, now: float) -> _KeyBudget:
        start, _ = period_bounds(period, now)
        state = self.keys.get(key_id)
        if state is None or state.period_start != start:
            # New period (or first sight since start-up): spend comes from the ledger,
            # never from a stale in-memory copy.
            state = self._install(key_id, start, self.load_spent(key_id, start))
        return state

    def _install(self, key_id: str, period_start: float, spent: float) -> _KeyBudget:
        """A period's state; reservations in flight carry over from the previous one."""
        previous = self.keys.get(key_id)
        state = _KeyBudget(period_start=period_start, spent=spent,
                           reservations=dict(previous.reservations) if previous else {})
        self.keys[key_id] = state
        return state

    def is_loaded(self, key_id: str, period: str, now: float) -> bool:
        state = self.keys.get(key_id)
        return state is not None and state.period_start == period_bounds(period, now)[0]

    def prime(self, key_id: str, period: str, now: float, spent: float) -> None:
        """Install a spend read elsewhere (off the event loop), unless loaded meanwhile."""
        if not self.is_loaded(key_id, period, now):
            self._install(key_id, period_bounds(period, now)[0], spent)

    def remaining(self, key_id: str, budget: float, period: str, now: float) -> float:
        state = self._state(key_id, period, now)
        return budget - state.spent - state.reserved

    def spent(self, key_id: str, period: str, now: float) -> float:
        return self._state(key_id, period, now).spent

    def reserved(self, key_id: str, period: str, now: float) -> float:
        return self._state(key_id, period, now).reserved

    def try_reserve(self, key_id: str, budget: float, period: str, now: float,
                    amount: float, reservation_id: str) -> bool:
        state = self._state(key_id, period, now)
        if state.spent + state.reserved + amount > budget + 1e-12:
            return False
        state.hold(reservation_id, amount)
        return True

    def try_extend(self, key_id: str, budget: float, period: str, now: float,
                   amount: float, reservation_id: str) -> bool:
        """Raise a reservation by `amount` if the budget still holds it."""
        state = self._state(key_id, period, now)
        if state.spent + state.reserved + amount > budget + 1e-12:
            return False
        state.hold(reservation_id, state.reservations.get(reservation_id, 0.0) + amount)
        return True

    def hold(self, key_id: str, period: str, now: float, reservation_id: str,
             amount: float) -> None:
        """Hold `amount` without a check (a reservation restored after a restart)."""
        self._state(key_id, period, now).hold(reservation_id, amount)

    def release(self, key_id: str, reservation_id: str) -> None:
        state = self.keys.get(key_id)
        if state is not None:
            state.drop(reservation_id)

    def settle(self, key_id: str, period: str, now: float, reservation_id: str,
               cost: float) -> tuple[float, float]:
        """Record the real cost; returns (spent before, spent after) for alerting."""
        state = self._state(key_id, period, now)
        state.drop(reservation_id)
        before = state.spent
        state.spent += cost
        return before, state.spent
