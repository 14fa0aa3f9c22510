"""Fallback chains from settings: tier (or explicit target) -> FallbackChain of Targets.

Transport-free: the caller passes how to reach the local model and a provider (in the
gateway: LocalLLMClient and the RemoteLLM handle), so this is unit-tested without Ray.
A provider without its API key is skipped with reason `no_key` before any call, which is
how the offline default shows up in x-fallback ("openai-mini:no_key>...>local").
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from serve_app.routing.config import LOCAL_TARGET, TIERS, RouterSettings
from serve_app.routing.fallback import CompleteFn, FallbackChain, StreamFn, Target
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
                 local_first_output_timeout_s: float | None = None) -> None:
        self.settings = settings
        self.local = local
        self.remote = remote
        self.local_model = local_model
        self.environ = environ
        self.local_skip = local_skip or (lambda: None)
        self.local_first_output_timeout_s = local_first_output_timeout_s

    def target(self, name: str) -> Target:
        if name == LOCAL_TARGET:
            return Target(LOCAL_TARGET, self.local.complete, self.local.stream,
                          skip_reason=self.local_skip, model=self.local_model,
                          first_output_timeout_s=self.local_first_output_timeout_s)
        provider = self.settings.provider(name)
        calls = self.remote(name)
        has_key = provider.available(self.environ)
        return Target(name, calls.complete, calls.stream,
                      skip_reason=(lambda: None) if has_key else (lambda: "no_key"),
                      model=provider.model)

    def for_tier(self, tier: str) -> FallbackChain:
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}")
        names = self.settings.resolved_chain(tier, self.environ)
        return FallbackChain([self.target(n) for n in names], label=f"tier {tier}")

    def for_explicit(self, target: str, policy: RoutingPolicy) -> FallbackChain:
        chains = {tier: self.settings.tiers.chain(tier) for tier in TIERS}
        names = policy.explicit_chain(target, chains)
        return FallbackChain([self.target(n) for n in names], label=f"model {target}")
