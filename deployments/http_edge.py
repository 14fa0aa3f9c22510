"""The HTTP edge of the Gateway: request ids, body size limit, error JSON, the per-request
log line. Exceptions become OpenAI-shaped responses here and nowhere else."""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.accounts.keys import bearer_token
from serve_app.address_gate import AddressGate
from serve_app.errors import ApiError, error_body, error_response, param_from_location
from serve_app.gateway.request_context import RequestContext, client_request_id_from, new_request_id

logger = logging.getLogger("ray.serve")  # into the replica's log file

REQUEST_ID_HEADER = "x-request-id"  # the caller's correlation id (Serve echoes it)
SERVER_ID_HEADER = "x-llmstack-request-id"  # ours: the key of the request's usage row


class EdgeHooks:
    """What the middleware needs from the ingress replica, registered in its constructor.

    A module-level registry (not a closure) because Serve pickles the ingress class and
    its FastAPI app by value; this module is imported by reference in the replica."""

    max_body_bytes: int = 1_000_000
    max_upload_bytes: int = 1_000_000  # document ingestion routes
    upload_prefix: str = "/v1/collections/"
    on_complete: Callable[[RequestContext], None] = staticmethod(lambda context: None)
    gate: AddressGate | None = None  # per-address limit on unauthenticated traffic
    gated_prefixes: tuple[str, ...] = ("/v1/", "/admin/")
    gated_posts: tuple[str, ...] = ("/console/login",)  # key guessing through a form

    @classmethod
    def limit_for(cls, path: str) -> int:
        return cls.max_upload_bytes if path.startswith(cls.upload_prefix) else cls.max_body_bytes


def register_edge_hooks(*, max_body_bytes: int,
                        on_complete: Callable[[RequestContext], None],
                        max_upload_bytes: int | None = None,
                        gate: AddressGate | None = None) -> None:
    EdgeHooks.max_body_bytes = max_body_bytes
    EdgeHooks.max_upload_bytes = max_upload_bytes or max_body_bytes
    EdgeHooks.on_complete = staticmethod(on_complete)
    EdgeHooks.gate = gate


def _serve_request_id() -> str | None:
    """Ray Serve's own request id (it honours an incoming x-request-id and returns the
    header itself); None outside Serve."""
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:
        return None


class RequestEdgeMiddleware:
    """Pure ASGI middleware (streaming-safe): it sees the end of a streamed body, so the
    log line and latency cover the whole response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        serve_id = _serve_request_id()
        # The server's id is always minted here; the caller's x-request-id (or Serve's id
        # for it) is kept only for correlation, never as a key of any internal state.
        context = RequestContext(
            request_id=new_request_id(),
            client_request_id=client_request_id_from(serve_id or headers.get(REQUEST_ID_HEADER)),
            route=scope.get("path", ""), method=scope.get("method", ""))
        scope.setdefault("state", {})["ctx"] = context
        limit = EdgeHooks.limit_for(context.route)
        response_started = False

        too_large = False

        async def send_with_id(message: Message) -> None:
            nonlocal response_started
            if too_large and not response_started:
                # The app answered a truncated body; answer 413 in its place.
                response_started = True
                await self._send_error(send_with_id_raw, _too_large(limit))
                return
            if too_large:
                return
            await send_with_id_raw(message)

        async def send_with_id_raw(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                context.status = message["status"]
                extra = [(SERVER_ID_HEADER.encode(), context.request_id.encode())]
                if serve_id is None:  # Serve's proxy adds x-request-id itself
                    extra.append((REQUEST_ID_HEADER.encode(),
                                  (context.client_request_id or context.request_id).encode()))
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        gated = context.route.startswith(EdgeHooks.gated_prefixes) or (
            context.method == "POST" and context.route in EdgeHooks.gated_posts)
        gate = EdgeHooks.gate if gated else None
        address = str((scope.get("client") or ("unknown",))[0])
        api_key = bearer_token(headers.get("authorization"), headers.get("x-api-key"))
        slot = None
        if gate is not None:
            wait, slot = gate.enter(address, api_key)
            if wait is not None:
                context.error_code = "too_many_unauthenticated"
                await self._send_error(send_with_id_raw, ApiError(
                    429, "Too many requests without a valid API key from this address; "
                    f"retry after {wait} s.", code="too_many_unauthenticated",
                    headers={"retry-after": str(wait)}))
                self._complete(context)
                return

        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._send_error(send_with_id_raw, _too_large(limit))
            self._complete(context)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received, too_large
            if too_large:
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Stop reading; whatever the app makes of the cut body is replaced.
                    too_large = True
                    context.error_code = "request_too_large"
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        try:
            await self.app(scope, limited_receive, send_with_id)
        except Exception:  # last line of defence: never a stack trace to the client
            logger.exception("unhandled error in %s %s", context.method, context.route)
            context.error_code = context.error_code or "internal_error"
            if not response_started:
                await self._send_error(send_with_id, ApiError(
                    500, "Internal error; the request id identifies it in the logs.",
                    code="internal_error"))
        finally:
            if gate is not None:
                gate.leave(address, api_key, slot, authenticated=context.key_id is not None
                           or bool(context.extra.get("admin")),
                           undecided=context.status in (503, 504))
            self._complete(context)

    @staticmethod
    def _complete(context: RequestContext) -> None:
        try:
            EdgeHooks.on_complete(context)
        except Exception:
            logger.exception("request completion hook failed")

    @staticmethod
    async def _send_error(send: Send, error: ApiError) -> None:
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
        await send({"type": "http.response.start", "status": error.status,
                    "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"Request body exceeds the limit of {limit} bytes.",
                    code="request_too_large")


def context_of(request: Request) -> RequestContext:
    return request.state.ctx


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        context_of(request).error_code = exc.code
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first: dict[str, Any] = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            error = ApiError(400, "The request body is not valid JSON: "
                             f"{first.get('ctx', {}).get('error', 'parse error')}.",
                             code="invalid_json")
        elif first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
            error = ApiError(400, "The request needs a JSON body.", code="invalid_json")
        else:
            param = param_from_location(first.get("loc", ()))
            error = ApiError(422, f"Invalid value for '{param}': {first.get('msg', 'invalid')}.",
                             code="invalid_value", param=param)
        context_of(request).error_code = error.code
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        from fastapi.responses import JSONResponse

        return JSONResponse(error_body(exc.status_code, message, code=code),
                            status_code=exc.status_code)
