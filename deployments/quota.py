"""Quota: the accounting service, in `quota.shards` single-replica deployments (Quota, or
Quota-0..Quota-N-1). Each shard owns the rate-limit windows, budget reservations and
cached key records of the keys that hash to it (serve_app.quota.sharding), so limits stay
exact with any number of gateways; all shards share the accounts store and the usage
ledger (one database). Thin shell over serve_app.quota.service.QuotaService; errors return
as payloads, and the batch methods return one outcome (result or payload) per item."""
from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

from ray import serve

from deployments.handles import BackgroundCalls
from deployments.metrics import QuotaMetrics
from serve_app.accounts.keys import parse_key_id
from serve_app.accounts.store import AccountStore
from serve_app.errors import ApiError, error_boundary
from serve_app.quota.alerts import WebhookNotifier
from serve_app.quota.journal import ReservationJournal
from serve_app.quota.ledger import UsageLedger, UsageRow
from serve_app.quota.service import QuotaPolicy, QuotaService
from serve_app.quota.sharding import shard_of
from serve_app.secrets_store import env_or_generated
from serve_app.settings import StackAppSettings

alert_logger = logging.getLogger("llmstack.alerts")


def _log_alert(payload: dict[str, Any]) -> None:
    alert_logger.warning(json.dumps(payload))


def _not_found(error: Exception) -> ApiError:
    return ApiError(404, f"not found: {error.args[0]}", code="not_found")


def _invalid_value(error: Exception) -> ApiError:
    return ApiError(400, str(error), code="invalid_value")


@serve.deployment(name="Quota", num_replicas=1, max_ongoing_requests=2000,
                  ray_actor_options={"num_cpus": 0.1})
@error_boundary("quota service", code="quota_unavailable",
                mapped={KeyError: _not_found, ValueError: _invalid_value})
class Quota:
    def __init__(self, settings: dict[str, Any], shard: int = 0) -> None:
        parsed = StackAppSettings.model_validate(settings)
        self.shard = shard
        quota = parsed.quota
        data_dir = parsed.data_dir
        if not alert_logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            alert_logger.addHandler(handler)
            alert_logger.propagate = False
        pepper = env_or_generated(quota.key_pepper_env, data_dir, "pepper").encode()
        admin_key = env_or_generated(quota.admin_key_env, data_dir, "admin.key")
        shards = quota.shards
        self._background = BackgroundCalls()  # journal releases after settlements
        self.service = QuotaService(
            AccountStore(parsed.database.target(data_dir / "accounts.db"), pepper),
            UsageLedger(parsed.database.target(data_dir / "usage.db")),
            QuotaPolicy(auth_required=quota.auth_required, window_s=quota.window_s,
                        reservation_ttl_s=quota.reservation_ttl_s,
                        alert_thresholds=tuple(quota.alert_thresholds),
                        alert_webhook_url=quota.alert_webhook_url),
            admin_key,
            notifier=WebhookNotifier(attempts=quota.webhook_attempts,
                                     first_delay_s=quota.webhook_first_delay_s),
            events=QuotaMetrics(), alert_log=_log_alert,
            # Its own SQLite file: an admission never waits on the ledger's fsync.
            journal=ReservationJournal(parsed.database.target(data_dir / "reservations.db")),
            owns=lambda key_id: shard_of(key_id, shards) == shard)

    # Every method is async, so all of them run on the replica's event loop, one at a
    # time between awaits: Ray runs sync methods in a thread pool, where they would race
    # the async ones over the same windows and reservations.

    # ---------------------------------------------------------------- request path
    async def admit(self, api_key: str | None, model: str, model_known: bool, tokens: int,
                    cost_usd: float, request_id: str, key_id: str | None = None) -> Any:
        await self._load(key_id if key_id is not None else parse_key_id(api_key or ""))
        admission = self.service.admit(  # decided atomically: no await before this returns
            api_key=api_key, model=model, model_known=model_known, tokens=tokens,
            cost_usd=cost_usd, request_id=request_id, key_id=key_id)
        await self.service.persist_admissions()  # journaled before the answer leaves
        return admission

    async def extend(self, request_id: str, tokens: int, cost_usd: float) -> Any:
        extended = self.service.extend(request_id, tokens, cost_usd)
        await self.service.persist_admissions()
        return extended

    async def caller(self, api_key: str | None, check_keys: bool = True) -> Any:
        return self.service.caller(api_key, check_keys)

    async def settle(self, row: dict[str, Any]) -> Any:
        await self._load(row.get("key_id"))
        return await self.service.settle(UsageRow(**row))

    async def _load(self, key_id: str | None) -> None:
        """A key's first sight reads the database: in a thread, so a slow or restarting
        database never stalls the requests of keys already in memory."""
        if self.service.needs_loading(key_id):
            assert key_id is not None
            state = await asyncio.to_thread(self.service.read_key_state, key_id)
            self.service.install_key_state(key_id, state)

    # A Gateway replica sends what queued up while its previous call was in flight as one
    # batch (serve_app.quota.batching): one handle round trip for many requests. Each
    # item goes through the decorated single method, so it gets its own outcome.
    async def admit_many(self, requests: list[dict[str, Any]]) -> list[Any]:
        # Tasks start in order and each decides before its first await, so admission
        # order is the batch's; their journal entries go out in one or two writes.
        return list(await asyncio.gather(*(self.admit(**request) for request in requests)))

    async def settle_many(self, rows: list[dict[str, Any]]) -> list[Any]:
        # Concurrently, so the ledger commits the whole batch in one transaction.
        outcomes = list(await asyncio.gather(*(self.settle(row) for row in rows)))
        self._background.submit("journal release", self.service.persist_releases())
        return outcomes

    # ---------------------------------------------------------------- admin
    async def create_key(self, tenant_id: str, fields: dict[str, Any],
                         key_id: str | None = None) -> Any:
        """`key_id`: chosen by the client so that the key's owner shard creates it."""
        return self.service.create_key(tenant_id, key_id=key_id, **fields)

    async def list_keys(self, tenant_id: str | None) -> list[dict[str, Any]]:
        return [k.public() for k in self.service.accounts.list(tenant_id)]

    async def get_key(self, key_id: str) -> Any:
        return _require(self.service.accounts.get(key_id), key_id).public()

    async def update_key(self, key_id: str, fields: dict[str, Any]) -> Any:
        return self.service.update_key(key_id, **fields)

    async def rotate_key(self, key_id: str, grace_s: float) -> Any:
        return self.service.rotate_key(key_id, grace_s)

    async def budget(self, key_id: str) -> Any:
        return self.service.budget_status(key_id)

    async def tenants(self) -> list[dict[str, Any]]:
        return self.service.accounts.tenants()

    async def usage_summary(self, query: dict[str, Any]) -> Any:
        return self.service.ledger.summary(**query)

    async def usage_rows(self, query: dict[str, Any]) -> Any:
        return self.service.ledger.rows(**query)

    async def usage_row(self, request_id: str) -> dict[str, Any] | None:
        return self.service.ledger.row(request_id)


def _require(value: Any, key: str) -> Any:
    if value is None:
        raise KeyError(key)
    return value
