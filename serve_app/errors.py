"""One error factory for every client-facing error.

Inside the pipeline failures are `ApiError`s (or values built by `api_error`); they become
OpenAI-shaped JSON only at the HTTP edge. Deployments behind handles return
`ErrorPayload` dicts instead of raising, so the type survives Ray serialisation.
"""
from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

# status -> OpenAI error type
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class ApiError(Exception):
    """A failure with a status code and a message that is safe to show a client."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, code=self.code, param=self.param)

    def to_payload(self) -> dict[str, Any]:
        """Serialisable form for returning across a deployment handle."""
        return {"__error__": True, "status": self.status, "message": self.message,
                "code": self.code, "param": self.param, "headers": self.headers}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "ApiError":
        return cls(payload["status"], payload["message"], code=payload.get("code"),
                   param=payload.get("param"), headers=payload.get("headers") or {})


def is_error_payload(value: Any) -> bool:
    return isinstance(value, dict) and value.get("__error__") is True


def error_body(status: int, message: str, *, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_response(error: ApiError, extra_headers: dict[str, str] | None = None) -> JSONResponse:
    headers = {**error.headers, **(extra_headers or {})}
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def param_from_location(loc: tuple[Any, ...] | list[Any]) -> str:
    """pydantic error location -> OpenAI `param` ('messages[0].role')."""
    parts: list[str] = []
    for item in loc:
        if item in ("body",):
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "body"
