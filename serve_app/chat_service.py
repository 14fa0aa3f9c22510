"""The chat completion pipeline, independent of Ray and FastAPI.

    admit (key, model, RPM/TPM/budget reserved)   -> 401/403/404/429
    cache lookup (tenant-scoped)                   -> hit: answer, usage 0, saving recorded
    retrieve (when RAG is asked for)               -> sources into the prompt
    route (auto: classifier; tier; explicit)       -> a fallback chain
    generate along the chain                       -> x-model, x-route-*, x-fallback
    record usage (durable, before the response)    -> then store the answer in the cache

Each step returns or raises `ApiError`; the HTTP edge turns errors into responses. A
streamed answer is started only once the chain has produced its first output, so a request
that fails early gets a proper status code instead of a broken stream.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from serve_app.cache.policy import query_text
from serve_app.cache.replay import completion_from_chunks
from serve_app.cache_stage import CacheStage, CacheStep, cache_headers, replay
from serve_app.errors import ApiError, is_error_payload
from serve_app.protocol import ChatCompletionRequest
from serve_app.quota.pricing import Price, estimate_prompt_tokens
from serve_app.quota.service import ANONYMOUS
from serve_app.rag.config import RagSettings
from serve_app.rag.prompting import RagContext, apply_rag, resolve_rag_options
from serve_app.request_context import RequestContext, redact_prompt
from serve_app.routing.gateway_router import GatewayRouter, RouteDecision, routing_text
from serve_app.sse import DONE, sse_error, sse_event

logger = logging.getLogger(__name__)

# Request fields that are ours, not the model's: never forwarded to an engine or provider.
GATEWAY_FIELDS = ("cache", "rag")


class Accounting(Protocol):
    async def admit(self, **kwargs: Any) -> dict[str, Any]: ...

    async def settle(self, row: dict[str, Any]) -> None: ...


class RetrieverPort(Protocol):
    async def search(self, tenant: str, options: dict[str, Any], query: str,
                     query_vector: list[float] | None) -> list[dict[str, Any]]: ...

    async def versions_current(self, tenant: str, source_ids: list[str]) -> bool: ...


@dataclass
class ChatOutcome:
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    stream: AsyncIterator[bytes] | None = None


class ChatService:
    def __init__(self, *, router: GatewayRouter, accounting: Accounting | None,
                 cache: CacheStage, retriever: RetrieverPort | None = None,
                 rag_settings: RagSettings | None = None, prompt_log_mode: str = "off",
                 on_tokens: Any = None, on_ttft: Any = None) -> None:
        self.router = router
        self.accounting = accounting
        self.cache = cache
        self.retriever = retriever
        self.rag_settings = rag_settings or RagSettings()
        self.prompt_log_mode = prompt_log_mode
        self.on_tokens = on_tokens or (lambda model, tokens_in, tokens_out: None)
        self.on_ttft = on_ttft or (lambda model, seconds: None)
        self._tasks: set[asyncio.Future[None]] = set()

    # ------------------------------------------------------------------ admission
    async def admit(self, ctx: RequestContext, *, api_key: str | None, model: str,
                    model_known: bool, texts: list[str], max_output_tokens: int | None,
                    price: Price, key_id: str | None = None) -> dict[str, Any]:
        """Authenticate (or trust `key_id` for internal calls) and reserve."""
        started = time.perf_counter()
        estimate = estimate_prompt_tokens(texts)
        ctx.extra["prompt_tokens_estimate"] = estimate
        if self.accounting is None:  # gateway features off: anonymous, nothing recorded
            if not model_known:
                raise ApiError(404, f"The model '{model}' does not exist.",
                               code="model_not_found", param="model")
            ctx.tenant = ANONYMOUS
            return {"tenant_id": ANONYMOUS, "key_id": ANONYMOUS, "can_confirm": False,
                    "route_overrides": {}, "cache_sampled": False}
        admission = await self.accounting.admit(
            api_key=api_key, key_id=key_id, model=model, model_known=model_known,
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
        ctx.stage("record", started)

    # ------------------------------------------------------------------ the pipeline
    async def handle(self, request: ChatCompletionRequest, ctx: RequestContext,
                     api_key: str | None, headers: Mapping[str, str] | None = None, *,
                     key_id: str | None = None) -> ChatOutcome:
        ctx.stream = request.stream
        texts = [m.text() for m in request.messages]
        ctx.prompt = redact_prompt("\n".join(texts), self.prompt_log_mode)  # type: ignore[arg-type]
        raw = request.model_dump()
        model, rag_options = resolve_rag_options(request.model, raw.get("rag"),
                                                 self.rag_settings)
        route = self.router.resolve(model)
        principal = await self.admit(
            ctx, api_key=api_key, key_id=key_id, model=model, model_known=route is not None,
            texts=texts, max_output_tokens=request.output_token_limit(),
            price=self.router.worst_price(route) if route else Price())
        assert route is not None  # admit answered 404 otherwise
        rag: RagContext | None = None
        step: CacheStep | None = None
        try:
            step = await self.cache.lookup(raw, headers or {}, principal, ctx)
            if step is not None and step.hit is not None:
                outcome = self._answer_from_cache(request, ctx, step)
            else:
                if rag_options is not None:
                    rag = await self._retrieve(request, rag_options.model_dump(), ctx, step)
                    request = ChatCompletionRequest.model_validate(
                        {**request.model_dump(exclude_none=True), "messages": rag.messages})
                started = time.perf_counter()
                messages = [m.model_dump() for m in request.messages]
                decision = await self.router.decide(
                    route, messages, _reusable_vector(step, routing_text(messages)),
                    principal.get("route_overrides"))
                ctx.stage("route", started)
                ctx.tier = decision.tier
                outcome = await self._generate(request, ctx, decision, step, rag)
        except ApiError as error:
            ctx.error_code = error.code
            ctx.tokens_in = ctx.tokens_out = 0
            ctx.cost_usd = 0.0
            await self.record(ctx, error.status)
            raise
        outcome.headers.update(cache_headers(ctx, step))
        if rag is not None and rag.header:
            outcome.headers["x-rag-sources"] = rag.header
        if outcome.stream is None:
            if rag is not None and outcome.body is not None:
                outcome.body["sources"] = rag.sources
            await self.record(ctx, 200)
            if step is not None and step.hit is None and outcome.body is not None:
                self._in_background(self._store(ctx, step, outcome.body, rag))
        return outcome

    def _answer_from_cache(self, request: ChatCompletionRequest, ctx: RequestContext,
                           step: CacheStep) -> ChatOutcome:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        cached = self.cache.answer(step, ctx, stream=request.stream,
                                   include_usage=include_usage)
        if cached.chunks is None:
            return ChatOutcome(headers=cached.headers, body=cached.body)
        return ChatOutcome(headers=cached.headers,
                           stream=self._sse(replay(cached.chunks), ctx, include_usage=True))

    # ------------------------------------------------------------------ retrieval
    async def _retrieve(self, request: ChatCompletionRequest, options: dict[str, Any],
                        ctx: RequestContext, step: CacheStep | None) -> RagContext:
        if self.retriever is None:
            raise ApiError(400, "Retrieval is not enabled on this deployment.",
                           code="rag_unavailable", param="rag")
        query = next((m.text() for m in reversed(request.messages) if m.role == "user"), "")
        if not query.strip():
            raise ApiError(400, "RAG needs a user message to search with.", param="messages")
        vector = _reusable_vector(step, query)
        started = time.perf_counter()
        chunks = await self.retriever.search(ctx.tenant or "", options, query, vector)
        ctx.stage("retrieve", started)
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        rag = apply_rag(messages, chunks, self.rag_settings)
        ctx.extra["sources"] = rag.chunk_refs
        return rag

    # ------------------------------------------------------------------ generation
    async def _generate(self, request: ChatCompletionRequest, ctx: RequestContext,
                        decision: RouteDecision, step: CacheStep | None,
                        rag: RagContext | None) -> ChatOutcome:
        payload = request.model_dump(exclude_none=True)
        for name in GATEWAY_FIELDS:
            payload.pop(name, None)
        started = time.perf_counter()
        if not request.stream:
            try:
                result = await decision.chain.complete(payload, ctx.request_id)
            finally:
                ctx.stage("generate", started)
            self._answered_by(ctx, result.target.name, result.target.model, result.hops)
            self._account(ctx, result.body.get("usage") or {})  # type: ignore[union-attr]
            return ChatOutcome(headers=self._route_headers(ctx, decision), body=result.body)
        result = await decision.chain.stream(payload, ctx.request_id)
        ctx.stage("first_output", started)
        self._answered_by(ctx, result.target.name, result.target.model, result.hops)
        assert result.chunks is not None
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        chunks = result.chunks
        if rag is not None:
            chunks = _with_sources(chunks, rag.sources)
        return ChatOutcome(headers=self._route_headers(ctx, decision),
                           stream=self._sse(chunks, ctx, include_usage, step, rag))

    def _answered_by(self, ctx: RequestContext, target: str, model: str | None,
                     hops: list[Any]) -> None:
        ctx.model = model or target
        ctx.extra["target"] = target
        ctx.fallback = [f"{hop.target}:{hop.reason}" for hop in hops]

    def _route_headers(self, ctx: RequestContext, decision: RouteDecision) -> dict[str, str]:
        headers = {"x-model": ctx.model or "", **decision.headers()}
        if ctx.fallback:
            headers["x-fallback"] = ">".join([*ctx.fallback, ctx.extra["target"]])
        return headers

    async def _sse(self, chunks: AsyncIterator[dict[str, Any]], ctx: RequestContext,
                   include_usage: bool, step: CacheStep | None = None,
                   rag: RagContext | None = None) -> AsyncIterator[bytes]:
        """Relay chunks as SSE; record usage before [DONE]; store the answer if cacheable."""
        started = time.perf_counter()
        collected: list[dict[str, Any]] = []
        content_chunks = 0
        usage_seen = ctx.cache == "hit"
        failed: ApiError | None = None
        try:
            async for chunk in chunks:
                if is_error_payload(chunk):
                    failed = ApiError.from_payload(chunk)
                    break
                if _has_content(chunk):
                    content_chunks += 1
                    if ctx.ttft_ms is None:
                        ctx.ttft_ms = round((time.perf_counter() - ctx.started) * 1000, 2)
                        self.on_ttft(ctx.model or "", ctx.ttft_ms / 1000)
                if step is not None:
                    collected.append(chunk)
                if chunk.get("usage") is not None:
                    if ctx.cache != "hit":
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
        ctx.stage("stream", started)
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
        elif step is not None and step.hit is None:
            body = completion_from_chunks(collected)
            if body is not None:
                self._in_background(self._store(ctx, step, body, rag))
        yield DONE

    # ------------------------------------------------------------------ cache store
    async def _store(self, ctx: RequestContext, step: CacheStep, body: dict[str, Any],
                     rag: RagContext | None) -> None:
        source_ids = None
        if rag is not None:
            source_ids = rag.source_ids
            body = {**body, "sources": rag.sources}
            # A document replaced while this answer was generated must not be cached
            # under its old version (its invalidation already ran).
            if source_ids and self.retriever is not None and not await \
                    self.retriever.versions_current(ctx.tenant or "", source_ids):
                return
        self.cache.store(step, ctx, body, source_ids)

    def _in_background(self, work: Awaitable[None]) -> None:
        """Work the response need not wait for (cache stores); kept referenced, logged."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)

        def done(finished: asyncio.Future[None]) -> None:
            self._tasks.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                logger.warning("background step failed: %r", finished.exception())

        task.add_done_callback(done)

    async def _record_quietly(self, ctx: RequestContext, status: int) -> None:
        try:
            await self.record(ctx, status)
        except ApiError:
            pass

    # ------------------------------------------------------------------ usage
    def _account_partial(self, ctx: RequestContext, content_chunks: int) -> None:
        """A stream that ended early has no usage chunk: count what was sent (about one
        token per chunk) against the prompt estimate."""
        self._account(ctx, {"prompt_tokens": ctx.extra.get("prompt_tokens_estimate", 0),
                            "completion_tokens": content_chunks})

    def _account(self, ctx: RequestContext, usage: Mapping[str, Any]) -> None:
        ctx.tokens_in = int(usage.get("prompt_tokens", 0))
        ctx.tokens_out = int(usage.get("completion_tokens", 0))
        target = ctx.extra.get("target")
        ctx.cost_usd = (self.router.cost(target, ctx.tokens_in, ctx.tokens_out)
                        if target else 0.0)
        self.on_tokens(ctx.model or "", ctx.tokens_in, ctx.tokens_out)


def _reusable_vector(step: CacheStep | None, text: str) -> list[float] | None:
    """The cache already embedded the last user message (whitespace runs collapsed); the
    router and the retriever use the same text, so they need not embed it again."""
    if step is None or step.vector is None or step.decision.query_text != query_text(text):
        return None
    return step.vector


async def _with_sources(chunks: AsyncIterator[dict[str, Any]],
                        sources: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    first = True
    async for chunk in chunks:
        if first and not is_error_payload(chunk):
            chunk = {**chunk, "sources": sources}
            first = False
        yield chunk


def _has_content(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls"):
            return True
    return False
