"""Deployment handles behind small async interfaces (ports), so the pipeline knows no Ray.

Handles to the models application are resolved lazily: the two applications of one
config file deploy concurrently and the stack may come up first.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from serve_app.accounts.keys import new_key_id
from serve_app.errors import ApiError, is_error_payload
from serve_app.quota.batching import Batcher
from serve_app.quota.sharding import shard_of, shard_of_token

logger = logging.getLogger(__name__)


class LazyHandle:
    def __init__(self, deployment: str, app_name: str | None) -> None:
        self.deployment = deployment
        self.app_name = app_name
        self._handle: Any = None

    def get(self) -> Any:
        if self._handle is None:
            from ray import serve

            try:
                self._handle = serve.get_deployment_handle(self.deployment, self.app_name)
            except Exception as exc:  # not deployed (yet)
                raise ApiError(503, f"{self.deployment} is not available yet; retry shortly.",
                               code="service_unavailable") from exc
        return self._handle

    async def call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        """An error payload comes back raised as its ApiError."""
        return await call_handle(getattr(self.get(), method).remote(*args), timeout_s,
                                 self.deployment, "service_unavailable")

    def stream(self, method: str, *args: Any) -> Any:
        return getattr(self.get().options(stream=True), method).remote(*args)


async def _await(response: Any) -> Any:
    return await response


async def call_handle(response: Any, timeout_s: float | None, service: str, code: str,
                      *, timeout_status: int = 504, timeout_code: str = "timeout") -> Any:
    """Await a DeploymentResponse. A timeout cancels it (504), a dead or failing replica
    is 503 `code`; an error payload (see serve_app.errors.error_boundary) is raised as
    the ApiError it describes.
    One place for the failure mapping every client below needs."""
    try:
        result = await asyncio.wait_for(_await(response), timeout_s)
    except asyncio.TimeoutError as exc:
        response.cancel()
        raise ApiError(timeout_status, f"{service} did not answer in time.",
                       code=timeout_code) from exc
    except ApiError:
        raise
    except Exception as exc:  # replica died, actor error: unavailable, never a trace
        raise ApiError(503, f"{service} is unavailable; retry the request.",
                       code=code) from exc
    if is_error_payload(result):
        raise ApiError.from_payload(result)
    return result


class LocalLLMClient:
    """The local model as a fallback-chain target, over the LocalLLM deployment."""

    def __init__(self, handle: LazyHandle, timeout_s: float) -> None:
        self.handle = handle
        self.timeout_s = timeout_s

    async def complete(self, request: dict[str, Any], request_id: str) -> dict[str, Any]:
        return await self.handle.call("chat", request, request_id, timeout_s=self.timeout_s)

    async def stream(self, request: dict[str, Any], request_id: str) -> AsyncIterator[dict[str, Any]]:
        generator = self.handle.stream("chat_stream", request, request_id)
        finished = False
        try:
            async for chunk in generator:
                yield chunk
            finished = True
        except ApiError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise ApiError(503, "The local model failed while streaming.",
                           code="service_unavailable") from exc
        finally:
            if not finished:
                # Client went away or a later step failed: stop generating downstream.
                generator.cancel()


class QuotaClient:
    """The accounting port over the Quota shards: admit before, settle after.

    Everything about a key goes to its owner shard (serve_app.quota.sharding); admits and
    settles to one shard are coalesced while a call is in flight (serve_app.quota.
    batching), so a busy gateway makes one round trip per batch, not per request."""

    def __init__(self, handles: Any, *, settle_retry_s: float, timeout_s: float = 15.0,
                 max_batch: int = 256, batching: bool = True) -> None:
        self.handles = list(handles) if isinstance(handles, (list, tuple)) else [handles]
        self.settle_retry_s = settle_retry_s
        self.timeout_s = timeout_s
        # batching off (benchmark baseline): one call per item, as many in flight as asked.
        # Admits may have two batches in flight: one stuck behind a key's first database
        # read (a restarting database) does not hold up keys already in the shard's memory.
        def batchers(method: str, in_flight: int) -> list[Batcher[Any]]:
            size, limit = (max_batch, in_flight) if batching else (1, 1 << 30)
            return [Batcher(self._sender(handle, method), max_batch=size,
                            max_in_flight=limit) for handle in self.handles]
        self._admits = batchers("admit_many", 2)
        self._settles = batchers("settle_many", 1)

    @property
    def shards(self) -> int:
        return len(self.handles)

    def _sender(self, handle: Any, method: str) -> Any:
        async def send(items: list[Any]) -> list[Any]:
            outcomes = await self._call(handle, method, items)
            return [ApiError.from_payload(o) if is_error_payload(o) else o for o in outcomes]
        return send

    async def _call(self, handle: Any, method: str, *args: Any) -> Any:
        # A slow Quota is treated like an absent one (503): settlement retries on it.
        return await call_handle(getattr(handle, method).remote(*args), self.timeout_s,
                                 "The quota service", "quota_unavailable",
                                 timeout_status=503, timeout_code="quota_unavailable")

    async def call(self, method: str, *args: Any, key: str | None = None) -> Any:
        """A single call: to `key`'s owner shard, or (no key: reads over the shared
        database) to the first shard."""
        shard = 0 if key is None else shard_of(key, self.shards)
        return await self._call(self.handles[shard], method, *args)

    async def caller(self, token: str | None, check_keys: bool) -> dict[str, Any]:
        shard = shard_of_token(token, self.shards)
        return await self._call(self.handles[shard], "caller", token, check_keys)

    async def create_key(self, tenant_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        """The key id is chosen here, so the shard that will own the key creates it."""
        key_id = new_key_id()
        return await self.call("create_key", tenant_id, fields, key_id, key=key_id)

    async def admit(self, **kwargs: Any) -> dict[str, Any]:
        key_id = kwargs.get("key_id")
        shard = (shard_of(key_id, self.shards) if key_id is not None
                 else shard_of_token(kwargs["api_key"], self.shards))
        return await self._admits[shard].submit(
            {name: kwargs.get(name) for name in _ADMIT_FIELDS})

    async def extend(self, request_id: str, key_id: str, tokens: int,
                     cost_usd: float) -> None:
        await self.call("extend", request_id, tokens, cost_usd, key=key_id)

    async def settle(self, row: dict[str, Any]) -> None:
        """Commit the usage row, retrying while the Quota replica is away (it is restarted
        by Serve); a row is never dropped silently: after the deadline this raises."""
        batcher = self._settles[shard_of(row["key_id"], self.shards)]
        deadline = asyncio.get_running_loop().time() + self.settle_retry_s
        delay = 0.1
        while True:
            try:
                await batcher.submit(row)
                return
            except ApiError as error:
                if error.status != 503 or asyncio.get_running_loop().time() > deadline:
                    raise ApiError(503, "The answer was generated but its usage could not be "
                                   "recorded; it was not delivered. Retry the request.",
                                   code="usage_not_recorded") from error
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


_ADMIT_FIELDS = ("api_key", "model", "model_known", "tokens", "cost_usd", "request_id",
                 "key_id")


class BackgroundCalls:
    """Fire-and-forget handle calls that are still awaited (and logged on failure), so
    they are neither garbage-collected mid-flight nor silently lost."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def submit(self, name: str, response: Any) -> None:
        async def wait() -> None:
            try:
                result = await response
                if is_error_payload(result):
                    logger.warning("%s failed: %s", name, result.get("message"))
            except Exception:
                logger.warning("%s failed", name, exc_info=True)

        task = asyncio.ensure_future(wait())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class CacheClient:
    """The cache port over the SemanticCache deployment. A failing cache is a miss."""

    # Savings (a metric and a counter in the cache's stats; the ledger row has the exact
    # amount) are summed here and sent at most this often: one handle call per hit was a
    # quarter of a hit's round trips.
    SAVINGS_EVERY_S = 2.0

    def __init__(self, handle: Any, timeout_s: float = 10.0,
                 clock: Any = time.monotonic) -> None:
        self.handle = handle
        self.timeout_s = timeout_s
        self.background = BackgroundCalls()
        self.clock = clock
        self._savings: dict[str, float] = {}
        self._savings_sent = clock()

    async def lookup(self, tenant: str, decision: dict[str, Any],
                     vector: list[float] | None, exact_only: bool = False,
                     request_id: str | None = None) -> dict[str, Any]:
        """`request_id`: the server's id; the cache remembers the hit under it, so the
        answer can be reported wrong by that id (POST /v1/cache/feedback)."""
        try:
            return await call_handle(
                self.handle.lookup.remote(tenant, decision, vector, exact_only, request_id),
                self.timeout_s, "The semantic cache", "cache_unavailable")
        except ApiError as error:  # a failing cache is a miss, never the request's failure
            logger.warning("cache lookup failed (%s); serving as a miss", error.message)
            return error.to_payload()

    def store(self, tenant: str, decision: dict[str, Any], vector: list[float] | None,
              completion: dict[str, Any], source_ids: list[str] | None,
              tier: str | None) -> None:
        self.background.submit("cache store", self.handle.store.remote(
            tenant, decision, vector, completion, source_ids, tier))

    def record_saving(self, usd: float, model: str) -> None:
        self._savings[model] = self._savings.get(model, 0.0) + usd
        if self.clock() - self._savings_sent >= self.SAVINGS_EVERY_S:
            self.flush_savings()

    def flush_savings(self) -> None:
        savings, self._savings = self._savings, {}
        self._savings_sent = self.clock()
        for model, usd in savings.items():
            self.background.submit("cache saving", self.handle.record_saving.remote(usd, model))

    async def call(self, method: str, *args: Any) -> Any:
        return await call_handle(getattr(self.handle, method).remote(*args), 60,
                                 "The semantic cache", "cache_unavailable")


class RetrieverClient:
    """The retrieval port over the Retriever deployment."""

    def __init__(self, handle: Any, timeout_s: float = 60.0,
                 ingest_timeout_s: float = 900.0) -> None:
        self.handle = handle
        self.timeout_s = timeout_s
        self.ingest_timeout_s = ingest_timeout_s

    async def call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        return await call_handle(getattr(self.handle, method).remote(*args),
                                 timeout_s or self.timeout_s, "The retriever",
                                 "retriever_unavailable")

    async def search(self, tenant: str, options: dict[str, Any], query: str,
                     query_vector: list[float] | None) -> list[dict[str, Any]]:
        return await self.call("search", tenant, options["collection"], query,
                               options.get("top_k"), options.get("mode"),
                               options.get("filters"), query_vector)

    async def versions_current(self, tenant: str, source_ids: list[str]) -> bool:
        from serve_app.rag.source_ids import parse_source_id

        wanted: dict[str, dict[str, int]] = {}
        for value in source_ids:
            ref = parse_source_id(value)
            wanted.setdefault(ref.collection, {})[ref.document_id] = ref.version
        for collection, versions in wanted.items():
            try:
                current = await self.call("current_versions", tenant, collection,
                                          list(versions))
            except ApiError:
                return False
            if any(current.get(doc) != version for doc, version in versions.items()):
                return False
        return True


class AgentClient:
    """Calls to the AgentRunner deployment; a message can run the loop for minutes."""

    def __init__(self, handle: Any, timeout_s: float, long_timeout_s: float) -> None:
        self.handle = handle
        self.timeout_s = timeout_s
        self.long_timeout_s = long_timeout_s

    async def call(self, method: str, *args: Any, long: bool = False) -> Any:
        response = getattr(self.handle, method).remote(*args)
        return await call_handle(response, self.long_timeout_s if long else self.timeout_s,
                                 "The agent (GET the session for its state)",
                                 "agent_unavailable")
