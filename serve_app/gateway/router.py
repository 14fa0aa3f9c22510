"""The router as the gateway uses it: model name -> route -> fallback chain, prices and the
model catalogue. No Ray: the local model, the providers, the classifier and the embedder
are injected callables (the gateway passes handles; tests pass fakes)."""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from serve_app.errors import ApiError
from serve_app.llm.token_count import COUNTERS, LocalCounter, PromptCounter
from serve_app.protocol import ChatCompletionRequest
from serve_app.quota.pricing import Price
from serve_app.routing.chains import ChainBuilder, TargetCalls
from serve_app.routing.config import LOCAL_TARGET, TIERS, RouterSettings
from serve_app.routing.features import routing_text
from serve_app.routing.fallback import FallbackChain
from serve_app.routing.load import LocalLoad, ProviderHealth
from serve_app.routing.policy import RouteRequest, RoutingPolicy

logger = logging.getLogger(__name__)

Classify = Callable[[str, list[float], dict[str, float] | None, str | None],
                    Awaitable[dict[str, Any]]]
Embed = Callable[[list[str]], Awaitable[list[list[float]]]]
FALLBACK_TIER = "medium"  # where `auto` goes when the classifier cannot answer


@dataclass
class RouteDecision:
    route: RouteRequest
    chain: FallbackChain
    tier: str | None = None
    score: float | None = None
    model_version: str | None = None

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.tier:
            headers["x-route-tier"] = self.tier
        if self.score is not None:
            headers["x-route-score"] = f"{self.score:.4f}"
        return headers


@dataclass(frozen=True)
class WorstCase:
    """What a request may cost on the dearest target it can reach: the reservation."""

    tokens: int  # prompt + n x capped output, on the target where that is largest
    cost_usd: float
    prompt_tokens: int  # the largest prompt count among the targets


class GatewayRouter:
    def __init__(self, settings: RouterSettings, *, local_model: str, local: TargetCalls,
                 remote: Callable[[str], TargetCalls], classify: Classify, embed: Embed,
                 environ: Mapping[str, str] | None = None,
                 local_skip: Callable[[], str | None] | None = None,
                 local_default_max_tokens: int = 256,
                 provider_default_max_tokens: int = 256,
                 local_counter: PromptCounter | None = None,
                 local_load: LocalLoad | None = None,
                 health: ProviderHealth | None = None) -> None:
        self.settings = settings
        self.local_model = local_model
        self.local_default_max_tokens = local_default_max_tokens
        self.provider_default_max_tokens = provider_default_max_tokens
        self.local_counter = local_counter or LocalCounter()
        # One counter per tokenizer kind, shared by the providers that use it, so a prompt
        # is counted once per kind (worst_case memoises by counter).
        kinds = {kind: COUNTERS[kind]() for kind in {p.tokenizer for p in settings.providers}}
        self.counters: dict[str, PromptCounter] = {
            provider.name: kinds[provider.tokenizer] for provider in settings.providers}
        self.environ = environ
        self.classify = classify
        self.embed = embed
        self.policy = RoutingPolicy(settings.policy,
                                    explicit_targets=settings.explicit_targets(local_model))
        self.chains = ChainBuilder(settings, local=local, remote=remote,
                                   local_model=local_model, environ=environ,
                                   local_skip=local_skip,
                                   provider_default_max_tokens=provider_default_max_tokens,
                                   local_load=local_load if local_load is not None else LocalLoad(
                                       settings.local.max_running_requests),
                                   health=health or ProviderHealth(
                                       settings.local.prefer_after_refusal_s))

    # ------------------------------------------------------------------ names and prices
    def resolve(self, model: str) -> RouteRequest | None:
        return self.policy.resolve(model)

    def _candidate_targets(self, route: RouteRequest) -> list[str]:
        if route.kind == "explicit":
            assert route.target is not None
            chains = {tier: self.settings.tiers.chain(tier) for tier in TIERS}
            return self.policy.explicit_chain(route.target, chains)
        tiers = TIERS if route.kind == "auto" else (route.tier,)
        names: list[str] = []
        for tier in tiers:
            names += [n for n in self.settings.resolved_chain(tier, self.environ)
                      if n not in names]
        return names

    def price(self, target: str) -> Price:
        pricing = self.settings.local if target == LOCAL_TARGET else self.settings.provider(target)
        return Price(input_per_mtok=pricing.price_in_per_mtok,
                     output_per_mtok=pricing.price_out_per_mtok)

    def worst_case(self, route: RouteRequest, request: ChatCompletionRequest) -> WorstCase:
        """Count the prompt as each reachable target would (its tokenizer), cap the output
        as that target will be capped, times `n`; the maximum over targets."""
        tokens, cost, prompt_max = 0, 0.0, 0
        asked = request.output_token_limit()
        counted: dict[int, int] = {}  # id(counter) -> this prompt's count
        for target in self._candidate_targets(route):
            if target != LOCAL_TARGET and not self.settings.target_available(target,
                                                                             self.environ):
                continue  # skipped with no_key before any call
            counter = self.local_counter if target == LOCAL_TARGET else self.counters[target]
            if id(counter) not in counted:
                counted[id(counter)] = counter.count(request)
            prompt = counted[id(counter)]
            output = asked or (self.local_default_max_tokens if target == LOCAL_TARGET
                               else self.provider_default_max_tokens)
            output *= request.n
            prompt_max = max(prompt_max, prompt)
            tokens = max(tokens, prompt + output)
            cost = max(cost, self.price(target).cost(prompt, output))
        return WorstCase(tokens=tokens, cost_usd=cost, prompt_tokens=prompt_max)

    def cost(self, target: str, tokens_in: int, tokens_out: int) -> float:
        return self.settings.target_cost_usd(target, tokens_in, tokens_out)

    # ------------------------------------------------------------------ decisions
    async def decide(self, route: RouteRequest, messages: Sequence[Mapping[str, Any]],
                     vector: list[float] | None, overrides: Mapping[str, Any] | None,
                     allowed: Collection[str] | None = None,
                     tenant: str | None = None) -> RouteDecision:
        """`allowed`: the key's allowed models; targets outside them are left out.
        `tenant` labels the classifier's metrics and drift guard."""
        if route.kind == "explicit":
            assert route.target is not None
            return RouteDecision(route, self.chains.for_explicit(route.target, self.policy,
                                                                 allowed))
        if route.kind == "tier":
            assert route.tier is not None
            return RouteDecision(route, self.chains.for_tier(route.tier, allowed),
                                 tier=route.tier)
        text = routing_text(messages)
        try:
            if vector is None:
                vector = (await self.embed([text]))[0]
            thresholds = (overrides or {}).get("thresholds")
            verdict = await self.classify(text, vector, thresholds, tenant)
        except ApiError as error:
            # No outage of the classifier reaches the client: a safe middle tier answers.
            logger.warning("classifier unavailable (%s); routing to %s", error.message,
                           FALLBACK_TIER)
            return RouteDecision(route, self.chains.for_tier(FALLBACK_TIER, allowed),
                                 tier=FALLBACK_TIER)
        tier = verdict["tier"]
        return RouteDecision(route, self.chains.for_tier(tier, allowed), tier=tier,
                             score=float(verdict["score"]),
                             model_version=verdict.get("model_version"))

    # ------------------------------------------------------------------ catalogue
    def catalog(self) -> list[dict[str, Any]]:
        """Models and aliases clients may name (GET /v1/models)."""
        entries = [{"id": self.settings.policy.auto_alias, "object": "model", "created": 0,
                    "owned_by": "router", "description": "complexity-routed across tiers"}]
        for tier in TIERS:
            entries.append({"id": tier, "object": "model", "created": 0, "owned_by": "router",
                            "chain": self.settings.resolved_chain(tier, self.environ)})
        for provider in self.settings.providers:
            entries.append({"id": provider.model, "object": "model", "created": 0,
                            "owned_by": provider.name,
                            "available": provider.available(self.environ)})
        return entries

