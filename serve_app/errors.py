"""One error type for every client-facing failure, and one way it crosses a handle.

Inside a process failures are `ApiError`s; they become OpenAI-shaped JSON only at the HTTP
edge (deployments/http_edge.py). Across a deployment handle an ApiError travels as its
payload (`to_payload`): every deployment shell is decorated with `error_boundary`, which
turns what its methods raise into payloads (an unexpected exception is logged and becomes
the shell's own 5xx, never a trace), and the one client helper (`deployments.handles.
call_handle`) raises the ApiError again on the caller's side. Payloads rather than raised
exceptions: Ray would log every refused request as a replica failure with its traceback.
"""
from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

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


_Shell = TypeVar("_Shell", bound=type)
# Methods Serve itself calls on a replica: their exceptions mean what Serve says they mean.
_SERVE_HOOKS = frozenset({"check_health", "reconfigure", "record_routing_stats"})


def error_boundary(service: str, code: str, *, status: int = 503,
                   mapped: Mapping[type[Exception], Callable[[Exception], ApiError]]
                   | None = None) -> Callable[[_Shell], _Shell]:
    """Class decorator for a deployment shell: each public method (sync, coroutine or async
    generator, each kept as it is) returns or yields an ApiError's payload instead of
    raising it. Exceptions of a type in `mapped` become the ApiError it makes; anything
    else is logged and becomes `status`/`code` with a message that names only the
    service."""
    # Serve writes the "ray.serve" logger into the replica's own log file (other loggers
    # end up in the worker's stderr file, where nobody looks).
    log = logging.getLogger("ray.serve")
    mapping = dict(mapped or {})

    def as_error(exc: Exception) -> ApiError:
        if isinstance(exc, ApiError):
            return exc
        for kind, make in mapping.items():
            if isinstance(exc, kind):
                return make(exc)
        log.exception("%s failed", service)
        return ApiError(status, f"The {service} failed; retry the request.", code=code)

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(method):
            @functools.wraps(method)
            async def stream(*args: Any, **kwargs: Any) -> Any:
                try:
                    async for item in method(*args, **kwargs):
                        yield item
                except Exception as exc:
                    yield as_error(exc).to_payload()
            return stream

        if inspect.iscoroutinefunction(method):
            @functools.wraps(method)
            async def call(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await method(*args, **kwargs)
                except Exception as exc:
                    return as_error(exc).to_payload()
            return call

        # A sync method stays sync: Serve runs it in its thread pool, off the event loop.
        @functools.wraps(method)
        def call_sync(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except Exception as exc:
                return as_error(exc).to_payload()
        return call_sync

    def decorate(cls: _Shell) -> _Shell:
        for name, member in list(vars(cls).items()):
            if name.startswith("_") or name in _SERVE_HOOKS or not callable(member):
                continue
            setattr(cls, name, wrap(member))
        return cls

    return decorate
