"""Upstream failures in a small set of classes, and how each one is treated.

| kind          | from                              | retried | falls back | breaker failure |
|---------------|-----------------------------------|---------|------------|-----------------|
| connect       | connection refused/reset/dropped  | yes     | yes        | yes             |
| timeout       | no answer / no chunk in time      | yes     | yes        | yes             |
| rate_limited  | HTTP 429 (Retry-After honoured)   | yes     | yes        | yes             |
| server        | HTTP 5xx, 408                     | yes     | yes        | yes             |
| auth          | HTTP 401/403 (our key is wrong)   | no      | yes        | yes             |
| not_found     | HTTP 404 (wrong model/base URL)   | no      | yes        | yes             |
| bad_request   | other 4xx (the request itself)    | no      | no         | no              |
| stream        | stream broke after data was sent  | no      | no         | yes             |

`hop` is the short reason written into `x-fallback` ("timeout", "connect", "429", "503").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serve_app.errors import ApiError

RETRYABLE_KINDS = frozenset({"connect", "timeout", "rate_limited", "server"})
FALLBACK_KINDS = RETRYABLE_KINDS | {"auth", "not_found"}
BREAKER_KINDS = FALLBACK_KINDS | {"stream"}

# error payload `code`s (across handles) that mean "try the next target"
FALLBACK_CODES = frozenset({"circuit_open", "no_key", "overloaded", "upstream_timeout",
                            "upstream_unavailable", "upstream_rate_limited",
                            "upstream_auth", "upstream_not_found", "engine_unavailable",
                            "service_unavailable", "timeout", "upstream_stream_failed"})


def is_retryable_status(status: int) -> bool:
    """429, 408 and 5xx retry; every other 4xx is the request's own fault and never does."""
    return status in (408, 429) or status >= 500


@dataclass
class UpstreamError(Exception):
    kind: str
    message: str
    status: int | None = None
    retry_after: float | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @classmethod
    def from_status(cls, status: int, message: str,
                    retry_after: float | None = None) -> "UpstreamError":
        if status == 429:
            kind = "rate_limited"
        elif status in (401, 403):
            kind = "auth"
        elif status == 404:
            kind = "not_found"
        elif is_retryable_status(status):
            kind = "server"
        else:
            kind = "bad_request"
        return cls(kind, message, status=status, retry_after=retry_after)

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE_KINDS

    @property
    def fallback(self) -> bool:
        return self.kind in FALLBACK_KINDS

    @property
    def breaker_failure(self) -> bool:
        return self.kind in BREAKER_KINDS

    @property
    def hop(self) -> str:
        if self.status is not None and self.kind in ("rate_limited", "server"):
            return str(self.status)
        return self.kind

    def to_api_error(self, provider: str) -> ApiError:
        """The client-facing error for this failure (when no fallback answers)."""
        headers = {}
        if self.retry_after is not None:
            headers["retry-after"] = str(max(1, round(self.retry_after)))
        if self.kind == "bad_request":
            return ApiError(self.status or 400, f"{provider} rejected the request: "
                            f"{self.message}", code="upstream_bad_request")
        status, code = {
            "timeout": (504, "upstream_timeout"),
            "rate_limited": (429, "upstream_rate_limited"),
            "auth": (502, "upstream_auth"),
            "not_found": (502, "upstream_not_found"),
            "stream": (502, "upstream_stream_failed"),
        }.get(self.kind, (503, "upstream_unavailable"))
        return ApiError(status, f"{provider} failed ({self.hop}): {self.message}", code=code,
                        headers=headers)

    def to_payload(self, provider: str) -> dict[str, Any]:
        payload = self.to_api_error(provider).to_payload()
        payload["upstream_kind"] = self.kind
        payload["hop"] = self.hop
        return payload
