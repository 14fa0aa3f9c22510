"""Router: learned complexity classifier, tier policy, remote providers and fallback.

Modules (one job each; none imports Ray):
- config.py           RouterSettings (providers, tier chains, classifier file, policy)
- features.py         cheap text features; routing_text(messages)
- classifier.py       ComplexityModel (versioned JSON model file) and ComplexityClassifier
- policy.py           model name -> route, score -> tier, calibration of thresholds
- errors.py           UpstreamError: failure kinds, retry/fallback/breaker treatment
- retry.py            backoff with jitter, Retry-After
- circuit_breaker.py  per-provider breaker with an injectable clock
- providers.py        ProviderClient over openai.AsyncOpenAI (one attempt per call)
- remote.py           RemoteProviders: clients + retries + breakers, called in-process
- fallback.py         FallbackChain: walks a tier's targets, x-fallback hops

The Serve shell is deployments/classifier.py; the per-request routing step is serve_app/gateway/router.py; training is in training/.
"""
from serve_app.routing.config import (
    LOCAL_TARGET,
    TIERS,
    ProviderSettings,
    RouterSettings,
)
from serve_app.routing.fallback import ChainOutcome, FallbackChain, Hop, Target
from serve_app.routing.features import routing_text
from serve_app.routing.policy import RouteRequest, RoutingPolicy, Thresholds, calibrate

__all__ = [
    "LOCAL_TARGET", "TIERS", "ProviderSettings", "RouterSettings", "ChainOutcome",
    "FallbackChain", "Hop", "Target", "routing_text", "RouteRequest", "RoutingPolicy",
    "Thresholds", "calibrate",
]
