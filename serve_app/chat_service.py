"""The chat completion pipeline, independent of Ray and FastAPI.

admit (auth, model, RPM/TPM/budget reservation) -> generate -> record usage (durably,
before the response is released) -> respond. Each step either returns or raises
`ApiError`; the HTTP edge turns errors into responses. A streamed answer is pulled until
its first item before the response starts, so a request that fails early still gets a
proper status code instead of a broken stream.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from serve_app.errors import ApiError, is_error_payload
from serve_app.handles import LLMClient
from serve_app.protocol import ChatCompletionRequest
from serve_app.quota.pricing import Price, estimate_prompt_tokens
from serve_app.quota.service import ANONYMOUS
from serve_app.request_context import RequestContext, redact_prompt
from serve_app.sse import DONE, sse_error, sse_event


class Accounting(Protocol):
    async def admit(self, **kwargs: Any) -> dict[str, Any]: ...

    async def settle(self, row: dict[str, Any]) -> None: ...


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
                 accounting: Accounting | None, price_of: Callable[[str], Price],
                 prompt_log_mode: str = "off",
                 on_tokens: Callable[[str, int, int], None] | None = None,
                 on_ttft: Callable[[str, float], None] | None = None) -> None:
        self.targets = targets
        self.accounting = accounting
        self.price_of = price_of
        self.prompt_log_mode = prompt_log_mode
        self.on_tokens = on_tokens or (lambda model, tokens_in, tokens_out: None)
        self.on_ttft = on_ttft or (lambda model, seconds: None)

    # ------------------------------------------------------------------ admission
    async def admit(self, ctx: RequestContext, *, api_key: str | None, model: str,
                    model_known: bool, texts: list[str], max_output_tokens: int | None,
                    price: Price) -> dict[str, Any]:
        started = time.perf_counter()
        estimate = estimate_prompt_tokens(texts)
        ctx.extra["prompt_tokens_estimate"] = estimate
        if self.accounting is None:  # gateway features off: anonymous, nothing recorded
            if not model_known:
                raise ApiError(404, f"The model '{model}' does not exist.",
                               code="model_not_found", param="model")
            ctx.tenant = ANONYMOUS
            return {"tenant_id": ANONYMOUS, "key_id": ANONYMOUS, "can_confirm": False,
                    "route_overrides": {}}
        admission = await self.accounting.admit(
            api_key=api_key, model=model, model_known=model_known,
            prompt_tokens=estimate, max_output_tokens=max_output_tokens,
            price=price.model_dump(), request_id=ctx.request_id)
        ctx.stage("admit", started)
        principal = admission["principal"]
        ctx.tenant = principal["tenant_id"]
        ctx.key_id = principal["key_id"]
        return principal

    async def record(self, ctx: RequestContext, status: int) -> None:
        """Write the usage row; returns only once it is committed."""
        if ctx.key_id is None or self.accounting is None:
            return
        ctx.status = status
        started = time.perf_counter()
        await self.accounting.settle({
            "request_id": ctx.request_id, "tenant_id": ctx.tenant, "key_id": ctx.key_id,
            "route": ctx.route, "status": status, "model": ctx.model, "tier": ctx.tier,
            "tokens_in": ctx.tokens_in, "tokens_out": ctx.tokens_out,
            "cost_usd": ctx.cost_usd, "cache_hit": ctx.cache == "hit",
            "saved_usd": float(ctx.extra.get("saved_usd", 0.0)),
            "latency_ms": round(ctx.elapsed_ms(), 2), "error_code": ctx.error_code,
            "fallback": ">".join(ctx.fallback) or None,
            "sources": ctx.extra.get("sources")})
        ctx.extra.pop("prompt_tokens_estimate", None)
        ctx.stage("record", started)

    # ------------------------------------------------------------------ chat
    def resolve(self, model: str) -> ModelTarget:
        target = self.targets().get(model)
        if target is None:
            raise ApiError(404, f"The model '{model}' does not exist. GET /v1/models lists "
                           "the models served here.", code="model_not_found", param="model")
        return target

    async def handle(self, request: ChatCompletionRequest, ctx: RequestContext,
                     api_key: str | None) -> ChatOutcome:
        ctx.stream = request.stream
        texts = [m.text() for m in request.messages]
        ctx.prompt = redact_prompt("\n".join(texts), self.prompt_log_mode)  # type: ignore[arg-type]
        known = request.model in self.targets()
        await self.admit(ctx, api_key=api_key, model=request.model, model_known=known,
                         texts=texts, max_output_tokens=request.output_token_limit(),
                         price=self.price_of(request.model))
        try:
            target = self.resolve(request.model)
            ctx.model = target.name
            outcome = await self._generate(request, ctx, target)
        except ApiError as error:
            ctx.error_code = error.code
            await self.record(ctx, error.status)
            raise
        if outcome.stream is None:
            await self.record(ctx, 200)
        return outcome

    async def _generate(self, request: ChatCompletionRequest, ctx: RequestContext,
                        target: ModelTarget) -> ChatOutcome:
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
        content_chunks = 0
        usage_seen = False
        failed: ApiError | None = None

        async def all_chunks() -> AsyncIterator[dict[str, Any]]:
            yield first
            async for chunk in chunks:
                yield chunk

        try:
            async for chunk in all_chunks():
                if is_error_payload(chunk):
                    failed = ApiError.from_payload(chunk)
                    break
                if _has_content(chunk):
                    content_chunks += 1
                    if ctx.ttft_ms is None:
                        ctx.ttft_ms = round((time.perf_counter() - ctx.started) * 1000, 2)
                        self.on_ttft(ctx.model or "", ctx.ttft_ms / 1000)
                if chunk.get("usage") is not None:
                    usage_seen = True
                    self._account(ctx, chunk["usage"])
                    if not include_usage:
                        continue
                yield sse_event(chunk)
        except ApiError as error:
            failed = error
        except (asyncio.CancelledError, GeneratorExit):
            # Client went away: what was generated still costs; record it off this task.
            if not usage_seen:
                self._account_partial(ctx, content_chunks)
            ctx.error_code = "client_disconnected"
            asyncio.ensure_future(self._record_quietly(ctx, 499))
            raise
        ctx.stage("generate", started)
        if failed is not None:
            ctx.error_code = failed.code
            if not usage_seen:
                self._account_partial(ctx, content_chunks)
        try:
            await self.record(ctx, failed.status if failed else 200)
        except ApiError as error:
            failed = failed or error
        if failed is not None:
            yield sse_error(failed.status, failed.message, failed.code)
        yield DONE

    async def _record_quietly(self, ctx: RequestContext, status: int) -> None:
        try:
            await self.record(ctx, status)
        except ApiError:
            pass

    def _account_partial(self, ctx: RequestContext, content_chunks: int) -> None:
        """A stream that ended early has no usage chunk: count what was sent (about one
        token per chunk) against the prompt estimate."""
        self._account(ctx, {"prompt_tokens": ctx.extra.get("prompt_tokens_estimate", 0),
                            "completion_tokens": content_chunks})

    def _account(self, ctx: RequestContext, usage: dict[str, Any]) -> None:
        ctx.tokens_in = int(usage.get("prompt_tokens", 0))
        ctx.tokens_out = int(usage.get("completion_tokens", 0))
        ctx.cost_usd = self.price_of(ctx.model or "").cost(ctx.tokens_in, ctx.tokens_out)
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
