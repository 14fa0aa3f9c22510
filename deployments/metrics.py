"""Every metric of the stack (Ray Serve metrics: the Ray dashboard, Prometheus), in one
place: the Gateway's and AgentRunner's request metrics (`serve_metrics`), the Quota's per-key
events (`QuotaMetrics`), the semantic cache's (`RayCacheMetrics`), the router
classifier's (`RouterMetrics`) and the agent's tool calls (`AgentMetrics`). Ray exports
each with a `ray_` prefix; dashboards/grafana/llmstack.json charts them (see README
"Dashboards").

Attribute names follow the OpenTelemetry GenAI conventions where one exists, with dots
turned into underscores because Prometheus tag keys cannot hold dots.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from serve_app.quota.ledger import UsageRow

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


class _Metrics:
    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "llmstack_requests_total", "HTTP requests by route and status code.",
            tag_keys=("route", "status"))
        self.latency = metrics.Histogram(
            "llmstack_request_latency_seconds", "End-to-end request latency.",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=("route",))
        self.ttft = metrics.Histogram(
            "llmstack_time_to_first_token_seconds", "Time to first streamed token.",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=("gen_ai_request_model",))
        self.tokens = metrics.Counter(
            "llmstack_tokens_total", "Tokens processed (type=input|output).",
            tag_keys=("gen_ai_request_model", "gen_ai_token_type"))
        self.stage_latency = metrics.Histogram(
            "llmstack_stage_latency_seconds", "Time spent in each stage of the chat pipeline "
            "(admit, cache_exact, embed, cache_lookup, retrieve, route, generate, "
            "first_output, stream, record).",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=("stage",))
        self.fallbacks = metrics.Counter(
            "llmstack_fallbacks_total", "Fallback-chain hops: a target left behind (reason) "
            "for the next one.", tag_keys=("from_target", "to_target", "reason"))
        self.breaker_state = metrics.Gauge(
            "llmstack_circuit_breaker_state", "Circuit breaker of each provider, as this "
            "replica sees it: 0 closed, 1 half-open, 2 open.", tag_keys=("target",))

    def observe_request(self, context: Any) -> None:
        """A finished chat request (a RequestContext): its stages and fallback hops."""
        for stage, ms in context.stages_ms.items():
            self.stage_latency.observe(ms / 1000, tags={"stage": stage})
        answered = context.extra.get("target")
        hops = [hop.rpartition(":") for hop in context.fallback]
        for i, (target, _, reason) in enumerate(hops):
            following = hops[i + 1][0] if i + 1 < len(hops) else answered
            self.fallbacks.inc(tags={"from_target": target, "to_target": following or "none",
                                     "reason": reason or "unknown"})

    def breakers(self, states: dict[str, str]) -> None:
        """{provider: BreakerState value} -> the gauge."""
        for target, state in states.items():
            self.breaker_state.set(BREAKER_STATE_VALUES.get(state, 0.0), tags={"target": target})


BREAKER_STATE_VALUES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


class RouteLabels:
    """Request path -> the app's route template (`/v1/agent/sessions/{session_id}`), so the
    `route` label has one value per route, not one per session, key or unknown path that
    a client sends (unmatched paths are "other")."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._routes: list[tuple[Any, str]] | None = None  # read once every router is in

    def __call__(self, path: str) -> str:
        if self._routes is None:
            self._routes = [(route.path_regex, route.path) for route in self.app.routes
                            if hasattr(route, "path_regex")]
        for regex, template in self._routes:
            if regex.match(path):
                return template
        return "other"


@lru_cache(maxsize=1)
def serve_metrics() -> Any:
    """One set of metric objects per process (created inside the replica)."""
    return _Metrics()


class QuotaMetrics:
    """The Quota's events (per key: requests, tokens, spend, rejections, alerts)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        keys = ("tenant", "key_id")
        self.requests = metrics.Counter("llmstack_key_requests_total",
                                        "Requests per key and status.", tag_keys=keys + ("status",))
        self.tokens = metrics.Counter("llmstack_key_tokens_total", "Tokens per key.",
                                      tag_keys=keys + ("direction",))
        self.cost = metrics.Counter("llmstack_cost_usd_total", "Spend in USD per key and model.",
                                    tag_keys=keys + ("model",))
        self.remaining = metrics.Gauge("llmstack_budget_remaining_usd",
                                       "Budget left in the current period.", tag_keys=keys)
        self.rejections = metrics.Counter("llmstack_rate_limited_total",
                                          "Requests refused by a limit (rpm, tpm, budget).",
                                          tag_keys=keys + ("limit",))
        self.alerts = metrics.Counter("llmstack_budget_alerts_total", "Budget alerts fired.",
                                      tag_keys=keys + ("threshold",))

    def rate_limited(self, tenant: str, key_id: str, limit: str) -> None:
        self.rejections.inc(tags={"tenant": tenant, "key_id": key_id, "limit": limit})

    def settled(self, row: UsageRow, remaining_budget: float | None) -> None:
        tags = {"tenant": row.tenant_id, "key_id": row.key_id}
        self.requests.inc(tags={**tags, "status": str(row.status)})
        # Ray counters refuse an increment of 0 (a cache hit has no tokens).
        if row.tokens_in:
            self.tokens.inc(row.tokens_in, tags={**tags, "direction": "input"})
        if row.tokens_out:
            self.tokens.inc(row.tokens_out, tags={**tags, "direction": "output"})
        if row.cost_usd:
            self.cost.inc(row.cost_usd, tags={**tags, "model": row.model or ""})
        if remaining_budget is not None:
            self.remaining.set(remaining_budget, tags=tags)

    def alert(self, tenant: str, key_id: str, threshold: float) -> None:
        self.alerts.inc(tags={"tenant": tenant, "key_id": key_id, "threshold": str(threshold)})


SIMILARITY_BOUNDARIES = [0.5, 0.6, 0.7, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99, 1.0]
LOOKUP_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]


class RayCacheMetrics:
    """CacheMetrics on ray.serve.metrics (Ray dashboard / Prometheus)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self._hits = metrics.Counter("llmstack_cache_hits_total", "Semantic cache hits.",
                                     tag_keys=("match", "namespace"))
        self._misses = metrics.Counter("llmstack_cache_misses_total",
                                       "Semantic cache misses by reason.",
                                       tag_keys=("reason", "namespace"))
        self._similarity = metrics.Histogram(
            "llmstack_cache_hit_similarity", "Cosine similarity of served cache hits.",
            boundaries=SIMILARITY_BOUNDARIES, tag_keys=("match",))
        self._latency = metrics.Histogram(
            "llmstack_cache_lookup_latency_seconds", "Cache lookup time inside the replica.",
            boundaries=LOOKUP_BOUNDARIES_S)
        self._entries = metrics.Gauge("llmstack_cache_entries", "Entries in the cache table.")
        self._evictions = metrics.Counter("llmstack_cache_evictions_total",
                                          "Entries removed by TTL expiry or the size cap.",
                                          tag_keys=("reason",))
        self._saved = metrics.Counter("llmstack_cache_saved_usd_total",
                                      "Estimated spend avoided by cache hits (USD).",
                                      tag_keys=("gen_ai_request_model",))

    def hit(self, match: str, similarity: float, namespace: str) -> None:
        self._hits.inc(tags={"match": match, "namespace": namespace})
        self._similarity.observe(similarity, tags={"match": match})

    def miss(self, reason: str, namespace: str) -> None:
        self._misses.inc(tags={"reason": reason, "namespace": namespace})

    def lookup_seconds(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def entries(self, count: int) -> None:
        self._entries.set(count)

    def evicted(self, count: int, reason: str) -> None:
        self._evictions.inc(count, tags={"reason": reason})

    def saved(self, usd: float, model: str) -> None:
        if usd > 0:
            self._saved.inc(usd, tags={"gen_ai_request_model": model})


SCORE_BOUNDARIES = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]


class RouterMetrics:
    """The classifier's decisions per tenant: score distribution, tier shares, drift."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self._score = metrics.Histogram(
            "llmstack_router_score", "Complexity score of routed prompts.",
            boundaries=SCORE_BOUNDARIES, tag_keys=("tenant",))
        self._tiers = metrics.Counter("llmstack_router_tier_total",
                                      "Prompts routed to each tier.",
                                      tag_keys=("tenant", "tier"))
        self._drift = metrics.Gauge(
            "llmstack_router_drift", "1 while a tenant's live tier shares are outside the "
            "calibrated range (see serve_app/routing/drift.py).", tag_keys=("tenant",))

    def routed(self, tenant: str, tier: str, score: float) -> None:
        self._score.observe(float(score), tags={"tenant": tenant})
        self._tiers.inc(tags={"tenant": tenant, "tier": tier})

    def drift(self, tenant: str, drifting: bool) -> None:
        self._drift.set(1.0 if drifting else 0.0, tags={"tenant": tenant})


class AgentMetrics:
    """The agent's tool calls and confirmations: the sink of the AgentRunner's
    AgentService events (serve_app/agent/events.py, derived from its audit rows)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self._tool_calls = metrics.Counter(
            "llmstack_agent_tool_calls_total", "Agent tool calls by outcome (ok, error, "
            "blocked, denied, expired, interrupted).",
            tag_keys=("gen_ai_tool_name", "outcome"))
        self._confirmations = metrics.Counter(
            "llmstack_agent_confirmations_total", "Human confirmations of irreversible agent "
            "tool calls: requested, then approved, denied or expired.",
            tag_keys=("gen_ai_tool_name", "decision"))

    def tool_call(self, tool: str, outcome: str) -> None:
        self._tool_calls.inc(tags={"gen_ai_tool_name": tool, "outcome": outcome})

    def confirmation(self, tool: str, decision: str) -> None:
        self._confirmations.inc(tags={"gen_ai_tool_name": tool, "decision": decision})
