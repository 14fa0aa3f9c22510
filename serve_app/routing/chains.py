"""Fallback chains from settings: tier (or explicit target) -> FallbackChain of Targets.

Transport-free: the caller passes how to reach the local model and a provider (in the
pipeline: LocalLLMClient and RemoteProviders.target_calls), so this is unit-tested without Ray.
A provider without its API key is skipped with reason `no_key` before any call, which is
how the offline default shows up in x-fallback ("openai-mini:no_key>...>local").
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from serve_app.errors import ApiError

from serve_app.routing.config import LOCAL_TARGET, TIERS, RouterSettings
from serve_app.routing.fallback import CompleteFn, FallbackChain, StreamFn, Target
from serve_app.routing.load import LocalLoad, ProviderHealth
from serve_app.routing.policy import RoutingPolicy


@dataclass
class TargetCalls:
    complete: CompleteFn
    stream: StreamFn


class ChainBuilder:
    def __init__(self, settings: RouterSettings, *, local: TargetCalls,
                 remote: Callable[[str], TargetCalls], local_model: str,
                 environ: Mapping[str, str] | None = None,
                 local_skip: Callable[[], str | None] | None = None,
                 local_first_output_timeout_s: float | None = None,
                 provider_default_max_tokens: int | None = None,
                 local_load: LocalLoad | None = None,
                 health: ProviderHealth | None = None) -> None:
        self.settings = settings
        self.provider_default_max_tokens = provider_default_max_tokens
        self.local_load = local_load
        self.health = health
        self.local = local
        self.remote = remote
        self.local_model = local_model
        self.environ = environ
        self.local_skip = local_skip or (lambda: None)
        self.local_first_output_timeout_s = local_first_output_timeout_s

    def target(self, name: str) -> Target:
        if name == LOCAL_TARGET:
            complete, stream, skip = self.local.complete, self.local.stream, self.local_skip
            load = self.local_load
            if load is not None:
                complete, stream = _counted(complete, stream, load)
                base_skip = skip
                def skip() -> str | None:  # noqa: E306
                    return base_skip() or load.skip_reason()
            return Target(LOCAL_TARGET, complete, stream, skip_reason=skip,
                          model=self.local_model,
                          first_output_timeout_s=self.local_first_output_timeout_s)
        provider = self.settings.provider(name)
        calls = self.remote(name)
        has_key = provider.available(self.environ)
        complete, stream = calls.complete, calls.stream
        cap = self.provider_default_max_tokens
        if cap is not None:
            # Providers are never asked for an unbounded answer: the reservation assumed
            # this cap when the client set none.
            def capped(request: dict[str, Any]) -> dict[str, Any]:
                if request.get("max_tokens") or request.get("max_completion_tokens"):
                    return request
                return {**request, "max_tokens": cap}

            complete = _with_request(calls.complete, capped)
            stream = _with_request(calls.stream, capped)
        return Target(name, complete, stream,
                      skip_reason=(lambda: None) if has_key else (lambda: "no_key"),
                      model=provider.model)

    def _chain(self, names: list[str], label: str,
               allowed: Collection[str] | None) -> FallbackChain:
        if self.health is not None:
            names = self.health.order(names, LOCAL_TARGET)
        targets = [self.target(n) for n in names]
        if allowed is not None:
            # A key's allowed_models bound the model that answers, not just the name asked.
            targets = [t for t in targets if t.name in allowed or t.model in allowed]
            if not targets:
                raise ApiError(403, f"This API key may not use any model that {label} can "
                               "route to.", code="model_not_allowed", param="model")
        return FallbackChain(targets, label=label, on_failure=self._failed)

    def _failed(self, target: str, reason: str, error: ApiError) -> None:
        """A provider that said 429 or has an open breaker goes behind local for a while."""
        if self.health is None or target == LOCAL_TARGET:
            return
        if reason in ("429", "circuit_open") or error.status == 429:
            try:
                wait = float(error.headers.get("retry-after", 0))
            except ValueError:
                wait = 0.0
            self.health.refused(target, wait)

    def for_tier(self, tier: str, allowed: Collection[str] | None = None) -> FallbackChain:
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}")
        names = self.settings.resolved_chain(tier, self.environ)
        return self._chain(names, f"tier {tier}", allowed)

    def for_explicit(self, target: str, policy: RoutingPolicy,
                     allowed: Collection[str] | None = None) -> FallbackChain:
        chains = {tier: self.settings.tiers.chain(tier) for tier in TIERS}
        names = policy.explicit_chain(target, chains)
        return self._chain(names, f"model {target}", allowed)


def _counted(complete: CompleteFn, stream: StreamFn, load: LocalLoad) -> tuple[Any, Any]:
    """The local target's calls, counted in flight for load-aware skipping."""
    async def counted_complete(request: dict[str, Any], request_id: str) -> Any:
        load.started()
        try:
            return await complete(request, request_id)
        finally:
            load.finished()

    async def counted_stream(request: dict[str, Any], request_id: str) -> Any:
        load.started()
        try:
            async for chunk in stream(request, request_id):
                yield chunk
        finally:
            load.finished()

    return counted_complete, counted_stream


def _with_request(call: Any, change: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    def wrapped(request: dict[str, Any], request_id: str) -> Any:
        return call(change(request), request_id)

    return wrapped
