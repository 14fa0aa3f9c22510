"""The chat completion pipeline, independent of Ray and FastAPI.

Each step either returns or raises `ApiError`; the HTTP edge turns errors into responses.
A streamed answer is pulled until its first item before the response starts, so a request
that fails early still gets a proper status code instead of a broken stream.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from serve_app.errors import ApiError, is_error_payload
from serve_app.handles import LLMClient
from serve_app.protocol import ChatCompletionRequest
from serve_app.request_context import RequestContext, redact_prompt
from serve_app.sse import DONE, sse_error, sse_event


@dataclass
class ChatOutcome:
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    stream: AsyncIterator[bytes] | None = None


@dataclass
class ModelTarget:
    name: str
    client: LLMClient


class ChatService:
    def __init__(self, *, targets: Callable[[], dict[str, ModelTarget]],
                 prompt_log_mode: str = "off",
                 on_tokens: Callable[[str, int, int], None] | None = None,
                 on_ttft: Callable[[str, float], None] | None = None) -> None:
        self.targets = targets
        self.prompt_log_mode = prompt_log_mode
        self.on_tokens = on_tokens or (lambda model, tokens_in, tokens_out: None)
        self.on_ttft = on_ttft or (lambda model, seconds: None)

    def resolve(self, model: str) -> ModelTarget:
        target = self.targets().get(model)
        if target is None:
            raise ApiError(404, f"The model '{model}' does not exist. GET /v1/models lists "
                           "the models served here.", code="model_not_found", param="model")
        return target

    async def handle(self, request: ChatCompletionRequest, ctx: RequestContext) -> ChatOutcome:
        target = self.resolve(request.model)
        ctx.model = target.name
        ctx.stream = request.stream
        ctx.prompt = redact_prompt(
            "\n".join(m.text() for m in request.messages), self.prompt_log_mode)  # type: ignore[arg-type]
        payload = request.model_dump(exclude_none=True)
        headers = {"x-model": target.name}
        if not request.stream:
            started = time.perf_counter()
            body = await target.client.complete(payload, ctx.request_id)
            ctx.stage("generate", started)
            self._account(ctx, body.get("usage") or {})
            return ChatOutcome(headers=headers, body=body)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        chunks = target.client.stream(payload, ctx.request_id)
        first = await _first_item(chunks)
        if is_error_payload(first):
            raise ApiError.from_payload(first)
        return ChatOutcome(headers=headers,
                           stream=self._sse(first, chunks, ctx, include_usage))

    async def _sse(self, first: dict[str, Any], chunks: AsyncIterator[dict[str, Any]],
                   ctx: RequestContext, include_usage: bool) -> AsyncIterator[bytes]:
        started = time.perf_counter()

        async def all_chunks() -> AsyncIterator[dict[str, Any]]:
            yield first
            async for chunk in chunks:
                yield chunk

        try:
            async for chunk in all_chunks():
                if is_error_payload(chunk):
                    error = ApiError.from_payload(chunk)
                    ctx.error_code = error.code
                    yield sse_error(error.status, error.message, error.code)
                    break
                if ctx.ttft_ms is None and _has_content(chunk):
                    ctx.ttft_ms = round((time.perf_counter() - ctx.started) * 1000, 2)
                    self.on_ttft(ctx.model or "", ctx.ttft_ms / 1000)
                if chunk.get("usage") is not None:
                    self._account(ctx, chunk["usage"])
                    if not include_usage:
                        continue
                yield sse_event(chunk)
        except ApiError as error:
            ctx.error_code = error.code
            yield sse_error(error.status, error.message, error.code)
        finally:
            ctx.stage("generate", started)
        yield DONE

    def _account(self, ctx: RequestContext, usage: dict[str, Any]) -> None:
        ctx.tokens_in = int(usage.get("prompt_tokens", 0))
        ctx.tokens_out = int(usage.get("completion_tokens", 0))
        self.on_tokens(ctx.model or "", ctx.tokens_in, ctx.tokens_out)


async def _first_item(chunks: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    try:
        return await chunks.__anext__()
    except StopAsyncIteration as exc:
        raise ApiError(503, "The model returned an empty stream.",
                       code="service_unavailable") from exc


def _has_content(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls"):
            return True
    return False
