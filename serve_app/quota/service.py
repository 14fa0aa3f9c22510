"""QuotaService: authentication, atomic check-and-reserve, settlement, alerts, admin ops.

A plain class (unit-tested without Ray) that the single Quota replica wraps. `admit` runs
without awaiting anything, so on the replica's event loop it is atomic: all checks pass
before any state changes, and no other request interleaves. Every Gateway replica calls
the same Quota replica, so limits hold exactly however many gateways there are.
"""
from __future__ import annotations

import hmac
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from serve_app.accounts.store import AccountStore, ApiKeyRecord, AuthFailure
from serve_app.errors import ApiError
from serve_app.quota.alerts import WebhookNotifier, crossed_thresholds
from serve_app.quota.budget import BudgetBook, period_bounds
from serve_app.quota.ledger import UsageLedger, UsageRow
from serve_app.quota.limits import KeyLimiter
from serve_app.quota.pricing import Price

ANONYMOUS = "anonymous"

_AUTH_MESSAGES = {
    "missing": ("No API key provided. Send 'Authorization: Bearer sk-...'.", "missing_api_key"),
    "unknown": ("Incorrect API key provided.", "invalid_api_key"),
    "disabled": ("This API key has been disabled.", "key_disabled"),
    "expired": ("This API key has expired.", "key_expired"),
}


class QuotaEvents(Protocol):
    def rate_limited(self, tenant: str, key_id: str, limit: str) -> None: ...
    def settled(self, row: UsageRow, remaining_budget: float | None) -> None: ...
    def alert(self, tenant: str, key_id: str, threshold: float) -> None: ...


class _NoEvents:
    def rate_limited(self, tenant: str, key_id: str, limit: str) -> None:
        pass

    def settled(self, row: UsageRow, remaining_budget: float | None) -> None:
        pass

    def alert(self, tenant: str, key_id: str, threshold: float) -> None:
        pass


@dataclass
class QuotaPolicy:
    auth_required: bool = True
    window_s: float = 60.0
    output_tokens_estimate: int = 256
    alert_thresholds: tuple[float, ...] = (0.5, 0.8, 1.0)
    alert_webhook_url: str | None = None


class QuotaService:
    def __init__(self, accounts: AccountStore, ledger: UsageLedger, policy: QuotaPolicy,
                 admin_key: str, *, clock: Callable[[], float] = time.time,
                 notifier: WebhookNotifier | None = None,
                 events: QuotaEvents | None = None,
                 alert_log: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.accounts = accounts
        self.ledger = ledger
        self.policy = policy
        self._admin_key = admin_key
        self.clock = clock
        self.notifier = notifier or WebhookNotifier()
        self.events = events or _NoEvents()
        self.alert_log = alert_log or (lambda payload: None)
        self.limiters: dict[str, KeyLimiter] = {}
        self.budgets = BudgetBook(self.ledger.spent_since)
        self.reservations: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ admission
    def authenticate(self, api_key: str | None,
                     key_id: str | None = None) -> ApiKeyRecord | None:
        """The key's record, None for an anonymous request (auth not required), or ApiError.
        `key_id` is for calls made on behalf of a key already authenticated (an agent
        session's steps): no secret, but disabled and expired keys still fail."""
        if key_id is not None:
            record = self.accounts.get(key_id)
            if record is None:
                raise ApiError(401, "The session's API key no longer exists.",
                               code="invalid_api_key")
            if record.disabled or (record.expires_at is not None
                                   and self.clock() >= record.expires_at):
                reason = "disabled" if record.disabled else "expired"
                message, code = _AUTH_MESSAGES[reason]
                raise ApiError(401, message, code=code)
            return record
        if not api_key and not self.policy.auth_required:
            return None
        try:
            return self.accounts.authenticate(api_key, self.clock())
        except AuthFailure as failure:
            message, code = _AUTH_MESSAGES[failure.reason]
            raise ApiError(401, message, code=code) from None

    def admit(self, *, api_key: str | None, model: str, model_known: bool,
              prompt_tokens: int, max_output_tokens: int | None, price: Price,
              request_id: str, key_id: str | None = None) -> dict[str, Any]:
        """Authenticate, authorise the model and reserve RPM, TPM and budget, atomically.
        Returns {"principal", "reservation"}; raises ApiError (401/403/404/429)."""
        record = self.authenticate(api_key, key_id)
        if not model_known:
            raise ApiError(404, f"The model '{model}' does not exist. GET /v1/models lists the "
                           "models served here.", code="model_not_found", param="model")
        if record is None:
            return {"principal": _anonymous(), "reservation": None}
        if not record.allows_model(model):
            raise ApiError(403, f"This API key may not use the model '{model}'.",
                           code="model_not_allowed", param="model")
        now = self.clock()
        output = max_output_tokens or self.policy.output_tokens_estimate
        tokens = prompt_tokens + output
        limiter = self.limiters.setdefault(record.key_id, KeyLimiter(self.policy.window_s))
        blocked = limiter.check(now, record.rpm, record.tpm, tokens)
        if blocked is not None:
            limit, wait = blocked
            self.events.rate_limited(record.tenant_id, record.key_id, limit)
            raise _rate_limited(limit, wait, record, tokens)
        worst_cost = price.cost(prompt_tokens, output)
        if record.budget_usd is not None:
            if not self.budgets.try_reserve(record.key_id, record.budget_usd,
                                            record.budget_period, now, worst_cost, request_id):
                self.events.rate_limited(record.tenant_id, record.key_id, "budget")
                remaining = self.budgets.remaining(record.key_id, record.budget_usd,
                                                   record.budget_period, now)
                _, period_end = period_bounds(record.budget_period, now)
                raise ApiError(
                    429, f"Budget exceeded: this request may cost up to ${worst_cost:.6f} and "
                    f"${max(remaining, 0):.6f} of the {record.budget_period}ly budget "
                    f"${record.budget_usd:.2f} is left. Lower max_tokens or wait for the next "
                    "period.", code="budget_exceeded",
                    headers={"retry-after": str(max(1, math.ceil(period_end - now)))})
        limiter.add(now, tokens, request_id)
        reservation = {"id": request_id, "key_id": record.key_id, "tokens": tokens,
                       "cost": worst_cost, "at": now}
        self.reservations[request_id] = reservation
        return {"principal": _principal(record), "reservation": reservation}

    # ------------------------------------------------------------------ settlement
    async def settle(self, row: UsageRow) -> dict[str, Any]:
        """Commit the ledger row (durably), then release the reservation and book the real
        cost. Idempotent by request id; works without a reservation (after a restart)."""
        already = self.ledger.row(row.request_id) is not None
        record = self.accounts.get(row.key_id)
        now = self.clock()
        row.ts = now
        if record is not None and record.budget_usd is not None:
            # Load this period's spend before the row lands, so it is not counted twice.
            self.budgets.spent(record.key_id, record.budget_period, now)
        await self.ledger.append(row)
        self.reservations.pop(row.request_id, None)
        if record is None or already:
            return {"recorded": True, "remaining_budget": None}
        limiter = self.limiters.get(record.key_id)
        if limiter is not None:
            limiter.settle(row.request_id, row.tokens_in + row.tokens_out)
        remaining = None
        if record.budget_usd is not None:
            before, after = self.budgets.settle(record.key_id, record.budget_period, now,
                                                row.request_id, row.cost_usd)
            remaining = self.budgets.remaining(record.key_id, record.budget_usd,
                                               record.budget_period, now)
            self._maybe_alert(record, before, after, now)
        self.events.settled(row, remaining)
        return {"recorded": True, "remaining_budget": remaining}

    def _maybe_alert(self, record: ApiKeyRecord, before: float, after: float,
                     now: float) -> None:
        assert record.budget_usd is not None
        period_start, _ = period_bounds(record.budget_period, now)
        for threshold in crossed_thresholds(before, after, record.budget_usd,
                                            self.policy.alert_thresholds):
            if not self.ledger.mark_alert(record.key_id, period_start, threshold):
                continue  # fired before in this period (e.g. before a restart)
            payload = {"type": "budget_alert", "tenant_id": record.tenant_id,
                       "key_id": record.key_id, "threshold": threshold,
                       "budget_usd": record.budget_usd, "spent_usd": round(after, 8),
                       "period": record.budget_period, "period_start": period_start,
                       "at": now}
            self.alert_log(payload)
            self.events.alert(record.tenant_id, record.key_id, threshold)
            url = record.alert_webhook_url or self.policy.alert_webhook_url
            if url:
                self.notifier.send(url, payload)

    # ------------------------------------------------------------------ admin
    def is_admin(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(token.encode(), self._admin_key.encode())

    def create_key(self, tenant_id: str, **fields: Any) -> dict[str, Any]:
        record, new = self.accounts.create_key(tenant_id, **fields)
        return {**record.public(), "key": new.secret}

    def update_key(self, key_id: str, **fields: Any) -> dict[str, Any]:
        return self.accounts.update(key_id, **fields).public()

    def rotate_key(self, key_id: str, grace_s: float = 0.0) -> dict[str, Any]:
        new = self.accounts.rotate(key_id, grace_s)
        return {**self.accounts.get(key_id).public(), "key": new.secret}  # type: ignore[union-attr]

    def budget_status(self, key_id: str) -> dict[str, Any]:
        record = self.accounts.get(key_id)
        if record is None:
            raise KeyError(key_id)
        now = self.clock()
        if record.budget_usd is None:
            return {"key_id": key_id, "budget_usd": None, "remaining_usd": None}
        start, end = period_bounds(record.budget_period, now)
        spent = self.budgets.spent(key_id, record.budget_period, now)
        reserved = self.budgets.reserved(key_id, record.budget_period, now)
        return {"key_id": key_id, "tenant_id": record.tenant_id,
                "budget_usd": record.budget_usd, "period": record.budget_period,
                "period_start": start, "period_end": end, "spent_usd": round(spent, 10),
                "reserved_usd": round(reserved, 10),
                "remaining_usd": round(record.budget_usd - spent - reserved, 10)}


def _principal(record: ApiKeyRecord) -> dict[str, Any]:
    return {"tenant_id": record.tenant_id, "key_id": record.key_id,
            "can_confirm": record.can_confirm, "route_overrides": record.route_overrides,
            "cache_sampled": record.cache_sampled}


def _anonymous() -> dict[str, Any]:
    return {"tenant_id": ANONYMOUS, "key_id": ANONYMOUS, "can_confirm": False,
            "route_overrides": {}, "cache_sampled": False}


def _rate_limited(limit: str, wait: float, record: ApiKeyRecord, tokens: int) -> ApiError:
    if math.isinf(wait):
        return ApiError(429, f"This request needs about {tokens} tokens, more than the key's "
                        f"limit of {record.tpm} tokens per minute; lower max_tokens.",
                        code="rate_limit_tpm")
    value = record.rpm if limit == "rpm" else record.tpm
    unit = "requests" if limit == "rpm" else "tokens"
    seconds = max(1, math.ceil(wait))
    return ApiError(429, f"Rate limit reached: {value} {unit} per minute. Retry after "
                    f"{seconds} s.", code=f"rate_limit_{limit}",
                    headers={"retry-after": str(seconds)})


def new_reservation_id() -> str:
    return uuid.uuid4().hex
