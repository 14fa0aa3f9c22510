"""Metric names and objects (Ray Serve metrics: shown in the Ray dashboard / Prometheus).

Attribute names follow the OpenTelemetry GenAI conventions where one exists, with dots
turned into underscores because Prometheus tag keys cannot hold dots.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

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


@lru_cache(maxsize=1)
def serve_metrics() -> Any:
    """One set of metric objects per process (created inside the replica)."""
    return _Metrics()
