"""Semantic cache: request policy, pair guard, LanceDB store and the service over them.

The SemanticCache deployment (deployments/semantic_cache.py) is a thin shell over
`serve_app.cache.service.CacheService`; the gateway uses `plan_cache` (which requests,
under which key) and `serve_app.cache.replay` (cached answers as responses and streams).
Importing this package does not import LanceDB (only `store` and `service` do), so the
gateway and app builder stay light.
"""
from serve_app.cache.config import CacheSettings
from serve_app.cache.guard import GuardVerdict, PairGuard
from serve_app.cache.policy import CacheDecision, plan_cache

__all__ = ["CacheDecision", "CacheSettings", "GuardVerdict", "PairGuard", "plan_cache"]
