"""The remote providers of one pipeline (each Gateway and AgentRunner replica holds one):
a client, a circuit breaker and a retry policy per provider, called in-process. Plain
class (no Ray), so tests run it against the fake provider.

Why in-process and not a deployment of its own: a provider call is network I/O, and a
Serve handle hop in front of it cost ~10 ms of CPU per request on each side (measured,
benchmarks/gateway_vs_litellm.py) for no work. The price: breakers are per replica, so
with R replicas a failing provider takes up to R x failure_threshold failed attempts
before every replica routes around it (each replica still opens within its own N).

Convention (as LocalLLM's engine): `chat` returns a completion dict or an error payload;
`chat_stream` yields chunk dicts and, on failure, one final error payload. Error payloads
carry `code` (`circuit_open`, `no_key`, `upstream_timeout`, ...) and `hop`, the short reason
the fallback walker writes into x-fallback.

Breaker accounting is per attempt: each failed attempt (connection, timeout, 429, 5xx,
auth) is one failure; a success or a request-side 4xx is a sign of life. A retry needs the
breaker's permission too, so a provider that trips mid-request is not hammered further.
Streams are held back until their first output (content, tool call, finish or usage): a
failure before it is retried like any other; after it the stream ends with an error
payload (`upstream_stream_failed`) and nothing is retried.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from serve_app.errors import ApiError
from serve_app.routing.circuit_breaker import CircuitBreaker
from serve_app.routing.config import ProviderSettings, RouterSettings
from serve_app.routing.errors import UpstreamError
from serve_app.routing.fallback import has_output
from serve_app.routing.providers import ClientFactory, ProviderClient, _default_client
from serve_app.routing.retry import call_with_retries, decide

if TYPE_CHECKING:
    from serve_app.routing.chains import TargetCalls

logger = logging.getLogger(__name__)


@dataclass
class ProviderRuntime:
    settings: ProviderSettings
    client: ProviderClient
    breaker: CircuitBreaker


class RemoteProviders:
    def __init__(self, settings: RouterSettings, *,
                 environ: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: Callable[[], float] = random.random,
                 client_factory: ClientFactory = _default_client) -> None:
        self.settings = settings
        self.sleep = sleep
        self.rng = rng
        self.providers: dict[str, ProviderRuntime] = {}
        for provider in settings.providers:
            self.providers[provider.name] = ProviderRuntime(
                settings=provider,
                client=ProviderClient(provider, environ, client_factory),
                breaker=CircuitBreaker(provider.circuit_breaker.failure_threshold,
                                       provider.circuit_breaker.reset_s, clock=clock))

    # ------------------------------------------------------------------ public
    def status(self) -> dict[str, Any]:
        """Per provider: key present, breaker state (for /readyz-style admin views)."""
        return {name: {"model": rt.settings.model, "has_key": rt.client.has_key,
                       **rt.breaker.snapshot()} for name, rt in self.providers.items()}

    async def chat(self, provider: str, request: dict[str, Any],
                   request_id: str) -> dict[str, Any]:
        runtime, refusal = self._gate(provider)
        if refusal is not None:
            return refusal
        assert runtime is not None

        async def attempt() -> dict[str, Any]:
            try:
                return await runtime.client.complete(request, request_id)
            except UpstreamError as error:
                self._record(runtime, error)
                raise

        def log_retry(error: UpstreamError, attempt_no: int, delay: float) -> None:
            logger.info("retrying %s after %s (attempt %d, wait %.2fs) for %s",
                        runtime.settings.name, error.hop, attempt_no, delay, request_id)

        try:
            result = await call_with_retries(attempt, runtime.settings.retry, sleep=self.sleep,
                                             rng=self.rng, on_retry=log_retry,
                                             may_retry=runtime.breaker.allow)
        except UpstreamError as error:
            return error.to_payload(runtime.settings.name)
        runtime.breaker.record_success()
        return result

    async def chat_stream(self, provider: str, request: dict[str, Any],
                          request_id: str) -> AsyncIterator[dict[str, Any]]:
        runtime, refusal = self._gate(provider)
        if refusal is not None:
            yield refusal
            return
        assert runtime is not None
        attempt = 0
        while True:
            attempt += 1
            committed = False
            buffered: list[dict[str, Any]] = []
            chunks = runtime.client.stream(request, request_id)
            try:
                async for chunk in chunks:
                    if committed:
                        yield chunk
                        continue
                    buffered.append(chunk)
                    if has_output(chunk):
                        committed = True
                        for held in buffered:
                            yield held
                        buffered.clear()
                if not committed:
                    raise UpstreamError("server", "the stream ended without any output")
            except UpstreamError as error:
                if committed:
                    self._record(runtime, UpstreamError("stream", error.message))
                    logger.warning("%s stream broke after output (%s) for %s",
                                   runtime.settings.name, error.hop, request_id)
                    yield UpstreamError("stream", f"the stream broke after output was sent "
                                        f"({error.hop})").to_payload(runtime.settings.name)
                    return
                self._record(runtime, error)
                wait = self._retry_wait(runtime, error, attempt, request_id)
                if wait is None:
                    yield error.to_payload(runtime.settings.name)
                    return
                await self.sleep(wait)
                continue
            finally:
                await chunks.aclose()
            runtime.breaker.record_success()
            return

    def target_calls(self, provider: str, timeout_s: float) -> "TargetCalls":
        """One provider as a fallback-chain target; a call past `timeout_s` is 504."""
        from serve_app.routing.chains import TargetCalls

        async def complete(request: dict[str, Any], request_id: str) -> dict[str, Any]:
            try:
                return await asyncio.wait_for(self.chat(provider, request, request_id),
                                              timeout_s)
            except asyncio.TimeoutError as exc:
                raise ApiError(504, f"{provider} did not answer in time.",
                               code="upstream_timeout") from exc

        def stream(request: dict[str, Any], request_id: str) -> AsyncIterator[dict[str, Any]]:
            return self.chat_stream(provider, request, request_id)

        return TargetCalls(complete, stream)

    async def aclose(self) -> None:
        for runtime in self.providers.values():
            await runtime.client.aclose()

    # ------------------------------------------------------------------ helpers
    def _gate(self, provider: str) -> tuple[ProviderRuntime | None, dict[str, Any] | None]:
        runtime = self.providers.get(provider)
        if runtime is None:
            return None, ApiError(404, f"unknown provider {provider!r}",
                                  code="provider_not_configured").to_payload()
        if not runtime.client.has_key:
            payload = ApiError(503, f"{provider} has no API key (set "
                               f"{runtime.settings.api_key_env})", code="no_key").to_payload()
            payload["hop"] = "no_key"
            return None, payload
        if not runtime.breaker.allow():
            payload = ApiError(503, f"{provider} is failing; its circuit breaker is open for "
                               f"{runtime.breaker.retry_in():.0f}s more",
                               code="circuit_open").to_payload()
            payload["hop"] = "circuit_open"
            return None, payload
        return runtime, None

    def _record(self, runtime: ProviderRuntime, error: UpstreamError) -> None:
        if error.breaker_failure:
            runtime.breaker.record_failure()
        else:
            runtime.breaker.record_success()

    def _retry_wait(self, runtime: ProviderRuntime, error: UpstreamError, attempt: int,
                    request_id: str) -> float | None:
        decision = decide(error, attempt, runtime.settings.retry, self.rng)
        if not decision.retry or not runtime.breaker.allow():
            return None
        logger.info("retrying %s after %s (attempt %d, wait %.2fs) for %s",
                    runtime.settings.name, error.hop, attempt, decision.delay_s, request_id)
        return decision.delay_s
