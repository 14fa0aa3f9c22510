"""QuotaService: authentication, atomic check-and-reserve, settlement, alerts, admin ops.

A plain class (unit-tested without Ray) that each Quota shard wraps. `admit` runs without
awaiting anything, so on the shard's event loop it is atomic: all checks pass before any
state changes, and no other request interleaves. Every request of a key goes to the key's
owner shard, so limits hold exactly however many gateways there are.

After a restart the windows of a key are rebuilt from the ledger on first sight (the rows
of the last window), and its budget spend is reloaded. With a reservation journal
(serve_app/quota/journal.py), what was admitted and not yet settled when the shard died is
restored too, so limits stay exact across the restart: the shell awaits
`persist_admissions()` before an admission's answer leaves the shard.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from serve_app.accounts.store import AccountStore, ApiKeyRecord, AuthFailure
from serve_app.errors import ApiError
from serve_app.quota.alerts import WebhookNotifier, crossed_thresholds
from serve_app.quota.budget import BudgetBook, period_bounds
from serve_app.quota.journal import JournalEntry, ReservationJournal
from serve_app.quota.ledger import UsageLedger, UsageRow
from serve_app.quota.limits import KeyLimiter

ANONYMOUS = "anonymous"
logger = logging.getLogger("ray.serve")

AUTH_MESSAGES = {
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
    reservation_ttl_s: float = 900.0
    alert_thresholds: tuple[float, ...] = (0.5, 0.8, 1.0)
    alert_webhook_url: str | None = None


class QuotaService:
    def __init__(self, accounts: AccountStore, ledger: UsageLedger, policy: QuotaPolicy,
                 admin_key: str, *, clock: Callable[[], float] = time.time,
                 notifier: WebhookNotifier | None = None,
                 events: QuotaEvents | None = None,
                 alert_log: Callable[[dict[str, Any]], None] | None = None,
                 journal: ReservationJournal | None = None,
                 owns: Callable[[str], bool] = lambda key_id: True) -> None:
        """`journal`: where admissions are recorded until they settle (restored at start);
        `owns(key_id)`: whether this shard owns a key (it restores only its own)."""
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
        self.reservations: dict[str, dict[str, Any]] = {}  # request id -> reservation
        self._settling: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.expired_reservations = 0
        self.journal = journal
        self._unjournaled: dict[str, JournalEntry] = {}  # admitted, not yet recorded
        self._journal_lock = asyncio.Lock()
        self._released: list[str] = []  # settled or expired, still in the journal
        self._released_at = time.monotonic()
        self._journal_down_until = 0.0
        self.restored = 0
        if journal is not None:
            self._restore(journal.live(clock()), owns)

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
                message, code = AUTH_MESSAGES[reason]
                raise ApiError(401, message, code=code)
            return record
        if not api_key and not self.policy.auth_required:
            return None
        try:
            return self.accounts.authenticate(api_key, self.clock())
        except AuthFailure as failure:
            message, code = AUTH_MESSAGES[failure.reason]
            raise ApiError(401, message, code=code) from None

    def admit(self, *, api_key: str | None, model: str, model_known: bool, tokens: int,
              cost_usd: float, request_id: str, key_id: str | None = None) -> dict[str, Any]:
        """Authenticate, authorise the model and reserve RPM, `tokens` of TPM and `cost_usd`
        of budget, atomically. `tokens` and `cost_usd` are the request's worst case (the
        caller counts what is really sent and caps the output). `request_id` is the
        server's id for this request (never a client's): the same admission sent again
        gets the reservation it holds, anything else under a held id is refused (409).
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
        self._expire_reservations(now)
        tokens = max(0, int(tokens))
        cost_usd = max(0.0, float(cost_usd))
        held = self.reservations.get(request_id)
        if held is not None:
            # The same admission sent again (Serve re-sends a call whose replica died after
            # it journaled the reservation): the reservation it already holds, counted once.
            # Ids are the gateway's own, so anything else under a held id is refused.
            if (held["key_id"], held["tokens"], held["cost"]) == (record.key_id, tokens,
                                                                  cost_usd):
                return {"principal": _principal(record), "reservation": held}
            raise ApiError(409, "Duplicate internal request id.", code="duplicate_request")
        limiter = self._limiter(record.key_id, now)
        blocked = limiter.check(now, record.rpm, record.tpm, tokens)
        if blocked is not None:
            limit, wait = blocked
            self.events.rate_limited(record.tenant_id, record.key_id, limit)
            raise _rate_limited(limit, wait, record, tokens)
        if record.budget_usd is not None:
            if not self.budgets.try_reserve(record.key_id, record.budget_usd,
                                            record.budget_period, now, cost_usd, request_id):
                raise self._budget_exceeded(record, now, cost_usd)
        limiter.add(now, tokens, request_id)
        reservation = {"id": request_id, "key_id": record.key_id, "tokens": tokens,
                       "cost": cost_usd, "at": now,
                       "expires_at": now + self.policy.reservation_ttl_s}
        self.reservations[request_id] = reservation
        self._journal(reservation)
        return {"principal": _principal(record), "reservation": reservation}

    def extend(self, request_id: str, tokens: int, cost_usd: float) -> dict[str, Any]:
        """Raise an admitted request's reservation (RAG context found after admission):
        the same TPM and budget checks as admission, for the extra part only."""
        now = self.clock()
        self._expire_reservations(now)
        reservation = self.reservations.get(request_id)
        if reservation is None:
            raise ApiError(409, "The request's reservation has expired.",
                           code="reservation_expired")
        record = self.accounts.get(reservation["key_id"])
        if record is None:
            raise ApiError(401, "The API key no longer exists.", code="invalid_api_key")
        tokens = max(0, int(tokens))
        cost_usd = max(0.0, float(cost_usd))
        limiter = self._limiter(record.key_id, now)
        if not limiter.try_extend(now, record.tpm, request_id, tokens):
            self.events.rate_limited(record.tenant_id, record.key_id, "tpm")
            wait = limiter.tokens.retry_after(now, tokens, float(record.tpm or 0))
            seconds = max(1, math.ceil(self.policy.window_s if math.isinf(wait) else wait))
            raise ApiError(429, f"Rate limit reached: {record.tpm} tokens per minute (the "
                           f"retrieved context adds {tokens}). Retry after {seconds} s or ask "
                           "for fewer sources.", code="rate_limit_tpm",
                           headers={"retry-after": str(seconds)})
        if record.budget_usd is not None and not self.budgets.try_extend(
                record.key_id, record.budget_usd, record.budget_period, now, cost_usd,
                request_id):
            limiter.tokens.adjust(request_id, reservation["tokens"])  # undo the TPM part
            raise self._budget_exceeded(record, now, cost_usd)
        reservation["tokens"] += tokens
        reservation["cost"] += cost_usd
        self._journal(reservation)
        return {"reservation": dict(reservation)}

    # ------------------------------------------------------------------ the journal
    def _journal(self, reservation: dict[str, Any]) -> None:
        if self.journal is not None:
            self._unjournaled[reservation["id"]] = JournalEntry(
                reservation["id"], reservation["key_id"], reservation["at"],
                reservation["tokens"], reservation["cost"], reservation["expires_at"])

    def _release_journaled(self, request_id: str) -> None:
        if self.journal is not None and self._unjournaled.pop(request_id, None) is None:
            self._released.append(request_id)

    async def persist_admissions(self) -> None:
        """Record the admissions made so far before their answers leave the shard (with
        the releases due, in the same write). A caller whose entries an earlier holder of
        the lock took finds them recorded. A failing journal (database away) is logged
        and retried with the next admissions: it only weakens exactness across a restart
        during that outage."""
        if (self.journal is None or not self._unjournaled
                or time.monotonic() < self._journal_down_until):
            return
        async with self._journal_lock:
            entries, self._unjournaled = self._unjournaled, {}
            if not entries:
                return
            released, self._released = self._released, []
            try:
                await asyncio.to_thread(self.journal.record, list(entries.values()), released)
            except Exception:
                # Admissions go on unrecorded for a while instead of each waiting for the
                # database; what queued is written once it is back.
                self._journal_down_until = time.monotonic() + self.JOURNAL_RETRY_S
                logger.warning("reservation journal unavailable; admissions go on "
                               "unrecorded, retrying in %.0f s", self.JOURNAL_RETRY_S,
                               exc_info=True)
                self._unjournaled = {**entries, **self._unjournaled}
                self._released = released + self._released
                return
            self._released_at = time.monotonic()

    JOURNAL_RETRY_S = 5.0

    # Settled entries are dropped lazily, with the next admissions or in batches: a stale
    # entry costs nothing (restart ignores entries that have a ledger row).
    RELEASE_BATCH = 256
    RELEASE_EVERY_S = 2.0

    async def persist_releases(self) -> None:
        if (self.journal is None or not self._released or self._journal_lock.locked()
                or time.monotonic() < self._journal_down_until
                or (len(self._released) < self.RELEASE_BATCH
                    and time.monotonic() - self._released_at < self.RELEASE_EVERY_S)):
            return
        async with self._journal_lock:
            released, self._released = self._released, []
            try:
                await asyncio.to_thread(self.journal.release, released)
            except Exception:
                self._released = released + self._released
            self._released_at = time.monotonic()

    def _restore(self, entries: list[JournalEntry], owns: Callable[[str], bool]) -> None:
        """A restarted shard takes back its unsettled admissions: reservations, window
        events (merged in time order with the ledger's) and budget holds."""
        mine = [e for e in entries if owns(e.key_id)]
        settled = self.ledger.settled([e.request_id for e in mine])
        now = self.clock()
        by_key: dict[str, list[JournalEntry]] = {}
        for entry in mine:
            if entry.request_id in settled:
                self._released.append(entry.request_id)
            else:
                by_key.setdefault(entry.key_id, []).append(entry)
        for key_id, pending in by_key.items():
            record = self.accounts.get(key_id)
            if record is None:
                continue
            events = [(at, tokens, None) for at, tokens in
                      self.ledger.recent_usage(key_id, now - self.policy.window_s)]
            events += [(e.at, e.tokens, e.request_id) for e in pending]
            self.limiters[key_id] = self._windows(sorted(events, key=lambda event: event[0]))
            for entry in pending:
                self.reservations[entry.request_id] = {
                    "id": entry.request_id, "key_id": key_id, "tokens": entry.tokens,
                    "cost": entry.cost_usd, "at": entry.at, "expires_at": entry.expires_at}
                if record.budget_usd is not None:
                    self.budgets.hold(key_id, record.budget_period, now, entry.request_id,
                                      entry.cost_usd)
                self.restored += 1
        # Expiry pops from the front: keep the reservations in expiry order.
        self.reservations = dict(sorted(self.reservations.items(),
                                        key=lambda item: item[1]["expires_at"]))

    # ------------------------------------------------------------------ warming up
    def needs_loading(self, key_id: str | None) -> bool:
        """Whether admitting or settling for this key would read the database: first
        sight of the key since start-up, or a budget period not loaded yet."""
        if key_id is None or key_id == ANONYMOUS:
            return False
        record = self.accounts.keys.get(key_id)
        if record is None or key_id not in self.limiters:
            return True
        return record.budget_usd is not None and not self.budgets.is_loaded(
            key_id, record.budget_period, self.clock())

    def read_key_state(self, key_id: str) -> dict[str, Any]:
        """The database reads a key's first admission needs. Thread-safe and side-effect
        free for the limit state: run it off the event loop (`asyncio.to_thread`), then
        hand the result to `install_key_state` on the loop."""
        now = self.clock()
        record = self.accounts.get(key_id)
        if record is None:
            return {"now": now, "record": None}
        state: dict[str, Any] = {"now": now, "record": record}
        if key_id not in self.limiters:
            state["recent"] = self.ledger.recent_usage(key_id, now - self.policy.window_s)
        if record.budget_usd is not None:
            start, _ = period_bounds(record.budget_period, now)
            state["spent"] = self.budgets.load_spent(key_id, start)
        return state

    def install_key_state(self, key_id: str, state: dict[str, Any]) -> None:
        """On the loop: what `read_key_state` found, unless something was loaded
        meanwhile (state already in memory always wins)."""
        record, now = state["record"], state["now"]
        if record is None:
            return
        if "recent" in state and key_id not in self.limiters:
            self.limiters[key_id] = self._windows(
                (at, tokens, None) for at, tokens in state["recent"])
        if "spent" in state:
            self.budgets.prime(key_id, record.budget_period, now, state["spent"])

    def _limiter(self, key_id: str, now: float) -> KeyLimiter:
        """The key's windows; on first sight since start-up, rebuilt from the ledger rows
        of the last window, so a restarted shard does not grant a fresh minute."""
        limiter = self.limiters.get(key_id)
        if limiter is None:
            limiter = self.limiters[key_id] = self._windows(
                (at, tokens, None) for at, tokens in
                self.ledger.recent_usage(key_id, now - self.policy.window_s))
        return limiter

    def _windows(self, events: Iterable[tuple[float, int, str | None]]) -> KeyLimiter:
        """A key's RPM/TPM windows from past events (time, tokens, request id or None),
        oldest first."""
        limiter = KeyLimiter(self.policy.window_s)
        for at, tokens, token in events:
            limiter.add(at, tokens, token)
        return limiter

    def _budget_exceeded(self, record: ApiKeyRecord, now: float, cost: float) -> ApiError:
        assert record.budget_usd is not None
        self.events.rate_limited(record.tenant_id, record.key_id, "budget")
        remaining = self.budgets.remaining(record.key_id, record.budget_usd,
                                           record.budget_period, now)
        _, period_end = period_bounds(record.budget_period, now)
        return ApiError(
            429, f"Budget exceeded: this request may cost up to ${cost:.6f} and "
            f"${max(remaining, 0):.6f} of the {record.budget_period}ly budget "
            f"${record.budget_usd:.2f} is left. Lower max_tokens or wait for the next "
            "period.", code="budget_exceeded",
            headers={"retry-after": str(max(1, math.ceil(period_end - now)))})

    def _expire_reservations(self, now: float) -> None:
        """Reservations whose request never settled (a crashed gateway) are released after
        their TTL instead of blocking the key's budget in every later period. Insertion
        order is expiry order (one TTL), so this pops from the front: O(1) amortised."""
        while self.reservations:
            request_id, reservation = next(iter(self.reservations.items()))
            if reservation["expires_at"] > now:
                return
            del self.reservations[request_id]
            self.budgets.release(reservation["key_id"], request_id)
            self._release_journaled(request_id)
            self.expired_reservations += 1

    # ------------------------------------------------------------------ settlement
    async def settle(self, row: UsageRow) -> dict[str, Any]:
        """Commit the ledger row (durably), then release the reservation and book the real
        cost. Idempotent by request id, also while a settlement of the same request is
        still committing (a retry joins it); works without a reservation (after a
        restart)."""
        running = self._settling.get(row.request_id)
        if running is not None:
            return await asyncio.shield(running)
        task = asyncio.ensure_future(self._settle(row))
        self._settling[row.request_id] = task
        task.add_done_callback(lambda _: self._settling.pop(row.request_id, None))
        return await asyncio.shield(task)

    async def _settle(self, row: UsageRow) -> dict[str, Any]:
        # A reservation held here means this is the first settlement of the request; only
        # without one (a retry, or a request admitted before a restart) is the ledger read.
        reserved = row.request_id in self.reservations
        already = not reserved and self.ledger.row(row.request_id) is not None
        record = self.accounts.get(row.key_id)
        now = self.clock()
        row.ts = now
        if record is not None and record.budget_usd is not None:
            # Load this period's spend before the row lands, so it is not counted twice.
            self.budgets.spent(record.key_id, record.budget_period, now)
        await self.ledger.append(row)
        self.reservations.pop(row.request_id, None)
        self._release_journaled(row.request_id)
        if record is None or already:
            if record is not None:
                self.budgets.release(record.key_id, row.request_id)
            return {"recorded": True, "remaining_budget": None}
        limiter = self.limiters.get(record.key_id)
        if limiter is not None:
            used = row.tokens_in + row.tokens_out
            if reserved:
                limiter.settle(row.request_id, used)
            else:  # admitted before a restart: count it now, or the window forgets it
                limiter.add(now, used, row.request_id, requests=1)
        remaining = None
        if record.budget_usd is not None:
            before, after = self.budgets.settle(record.key_id, record.budget_period, now,
                                                row.request_id, row.cost_usd)
            remaining = self.budgets.remaining(record.key_id, record.budget_usd,
                                               record.budget_period, now)
            await self._maybe_alert(record, before, after, now)
        self.events.settled(row, remaining)
        return {"recorded": True, "remaining_budget": remaining}

    async def _maybe_alert(self, record: ApiKeyRecord, before: float, after: float,
                           now: float) -> None:
        assert record.budget_usd is not None
        period_start, _ = period_bounds(record.budget_period, now)
        for threshold in crossed_thresholds(before, after, record.budget_usd,
                                            self.policy.alert_thresholds):
            if not await asyncio.to_thread(self.ledger.mark_alert, record.key_id,
                                           period_start, threshold):
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
    def caller(self, api_key: str | None, check_keys: bool = True) -> dict[str, Any]:
        """Who is calling, in one step: the admin key, a tenant key's principal, or
        anonymous (keys not required, or `check_keys` off because the gateway does no
        accounting). Raises ApiError 401 for a key that does not authenticate."""
        if self.is_admin(api_key):
            return {"tenant_id": None, "key_id": "admin", "can_confirm": True,
                    "can_self_confirm": False, "admin": True}
        record = self.authenticate(api_key) if check_keys else None
        if record is None:
            return {**_anonymous(), "admin": False}
        return {"tenant_id": record.tenant_id, "key_id": record.key_id,
                "can_confirm": record.can_confirm, "can_self_confirm": record.can_self_confirm,
                "admin": False}

    def is_admin(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(token.encode(), self._admin_key.encode())

    def create_key(self, tenant_id: str, key_id: str | None = None,
                   **fields: Any) -> dict[str, Any]:
        record, new = self.accounts.create_key(tenant_id, key_id=key_id, **fields)
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
            "can_confirm": record.can_confirm, "can_self_confirm": record.can_self_confirm,
            "route_overrides": record.route_overrides,
            "cache_sampled": record.cache_sampled, "allowed_models": record.allowed_models}


def _anonymous() -> dict[str, Any]:
    return {"tenant_id": ANONYMOUS, "key_id": ANONYMOUS, "can_confirm": False,
            "can_self_confirm": False, "route_overrides": {}, "cache_sampled": False,
            "allowed_models": None}


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

