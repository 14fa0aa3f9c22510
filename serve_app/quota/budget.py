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
    period_start: float
    spent: float
    reservations: dict[str, float] = field(default_factory=dict)

    @property
    def reserved(self) -> float:
        return sum(self.reservations.values())


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
            # never from a stale in-memory copy. Reservations in flight carry over.
            carried = state.reservations if state else {}
            state = _KeyBudget(period_start=start, spent=self.load_spent(key_id, start),
                               reservations=dict(carried))
            self.keys[key_id] = state
        return state

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
        state.reservations[reservation_id] = amount
        return True

    def try_extend(self, key_id: str, budget: float, period: str, now: float,
                   amount: float, reservation_id: str) -> bool:
        """Raise a reservation by `amount` if the budget still holds it."""
        state = self._state(key_id, period, now)
        if state.spent + state.reserved + amount > budget + 1e-12:
            return False
        state.reservations[reservation_id] = state.reservations.get(reservation_id, 0.0) + amount
        return True

    def release(self, key_id: str, reservation_id: str) -> None:
        state = self.keys.get(key_id)
        if state is not None:
            state.reservations.pop(reservation_id, None)

    def settle(self, key_id: str, period: str, now: float, reservation_id: str,
               cost: float) -> tuple[float, float]:
        """Record the real cost; returns (spent before, spent after) for alerting."""
        state = self._state(key_id, period, now)
        state.reservations.pop(reservation_id, None)
        before = state.spent
        state.spent += cost
        return before, state.spent
