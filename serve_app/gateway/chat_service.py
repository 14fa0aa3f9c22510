"""The chat completion pipeline, independent of Ray and FastAPI.

    admit (key, model; the worst case of RPM/TPM/budget reserved)  -> 401/403/404/429
    cache lookup (tenant-scoped)                   -> hit: answer, usage 0, saving recorded
    retrieve (when RAG is asked for)               -> sources into the prompt
    route (auto: classifier; tier; explicit)       -> a fallback chain
    generate along the chain                       -> x-model, x-route-*, x-fallback
    record usage (durable, before the response)    -> then store the answer in the cache

Each step returns or raises `ApiError`; the HTTP edge turns errors into responses. After
admission every request is settled exactly once (a usage row, the reservation released),
whether it succeeds, fails, raises something unexpected or loses its client. A
streamed answer is started only once the chain has produced its first output, so a request
that fails early gets a proper status code instead of a broken stream.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from serve_app.accounts.keys import parse_key_id
from serve_app.cache.policy import query_text
from serve_app.cache.replay import completion_from_chunks
from serve_app.gateway.cache_stage import CacheStage, CacheStep, cache_headers, replay
from serve_app.errors import ApiError, is_error_payload
from serve_app.protocol import ChatCompletionRequest
from serve_app.quota.service import ANONYMOUS, AUTH_MESSAGES
from serve_app.rag.config import RagSettings
from serve_app.rag.prompting import RagContext, apply_rag, resolve_rag_options
from serve_app.gateway.request_context import RequestContext, redact_prompt
from serve_app.gateway.router import (
    GatewayRouter,
    RouteDecision,
    WorstCase,
    routing_text,
)
from serve_app.gateway.sse import DONE, sse_error, sse_event

logger = logging.getLogger(__name__)

# Request fields that are ours, not the model's: never forwarded to an engine or provider.
GATEWAY_FIELDS = ("cache", "rag")
# Prompts up to this many characters are counted inline (well under a millisecond).
INLINE_COUNT_CHARS = 8_000


class Accounting(Protocol):
    async def admit(self, **kwargs: Any) -> dict[str, Any]: ...

    async def extend(self, request_id: str, key_id: str, tokens: int,
                     cost_usd: float) -> None: ...

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
                 on_tokens: Any = None, on_ttft: Any = None,
                 auth_required: bool = True) -> None:
        self.auth_required = auth_required
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
                    model_known: bool, worst: WorstCase,
                    key_id: str | None = None) -> dict[str, Any]:
        """Authenticate (or trust `key_id` for internal calls) and reserve the worst case.
        From the moment this returns, the request is settled exactly once, whatever
        happens (see `settle` and `settle_in_background`)."""
        started = time.perf_counter()
        ctx.extra["prompt_tokens_estimate"] = worst.prompt_tokens
        if key_id is None and self.accounting is not None:
            _refuse_unusable_key(api_key, self.auth_required)
        if self.accounting is None:  # gateway features off: anonymous, nothing recorded
            if not model_known:
                raise ApiError(404, f"The model '{model}' does not exist.",
                               code="model_not_found", param="model")
            ctx.tenant = ANONYMOUS
            return {"tenant_id": ANONYMOUS, "key_id": ANONYMOUS, "can_confirm": False,
                    "route_overrides": {}, "cache_sampled": False, "allowed_models": None}
        admission = await self.accounting.admit(
            api_key=api_key, key_id=key_id, model=model, model_known=model_known,
            tokens=worst.tokens, cost_usd=worst.cost_usd, request_id=ctx.request_id)
        ctx.stage("admit", started)
        principal = admission["principal"]
        ctx.tenant = principal["tenant_id"]
        ctx.key_id = principal["key_id"]
        ctx.admitted = True
        return principal

    async def settle(self, ctx: RequestContext, status: int) -> None:
        """Write the usage row (returns once it is committed) and release the reservation.
        Once per request; the write runs in its own task, so a client that goes away
        while it runs cannot cancel it (the row is still written)."""
        task = self._begin_settle(ctx, status)
        if task is None:
            return
        started = time.perf_counter()
        await asyncio.shield(task)
        ctx.stage("record", started)

    def settle_in_background(self, ctx: RequestContext, status: int) -> None:
        """The HTTP edge's last resort: a request admitted but never settled (a stream the
        client left before it started, a crash in a route) is settled here."""
        if not ctx.admitted or ctx.settled:
            return
        if ctx.error_code is None:
            ctx.error_code = "client_disconnected" if status in (0, 499) else "internal_error"
        self._begin_settle(ctx, status or 499)

    def _begin_settle(self, ctx: RequestContext, status: int) -> asyncio.Future[Any] | None:
        """Marks the request settled at once (so nothing settles it twice) and starts the
        write; None if there is nothing (more) to settle."""
        if ctx.settled or ctx.key_id is None or self.accounting is None:
            return None
        ctx.settled = True
        ctx.status = status
        return self._in_background(self._write_row(ctx, status), quiet=False)

    async def _write_row(self, ctx: RequestContext, status: int) -> None:
        assert self.accounting is not None
        await self.accounting.settle({
            "request_id": ctx.request_id, "client_request_id": ctx.client_request_id,
            "tenant_id": ctx.tenant, "key_id": ctx.key_id,
            "route": ctx.route, "status": status, "model": ctx.model, "tier": ctx.tier,
            "tokens_in": ctx.tokens_in, "tokens_out": ctx.tokens_out,
            "cost_usd": ctx.cost_usd, "cache_hit": ctx.cache == "hit",
            "saved_usd": float(ctx.extra.get("saved_usd", 0.0)),
            "latency_ms": round(ctx.elapsed_ms(), 2), "error_code": ctx.error_code,
            "fallback": ">".join(ctx.fallback) or None,
            "sources": ctx.extra.get("sources")})

    # ------------------------------------------------------------------ the pipeline
    async def handle(self, request: ChatCompletionRequest, ctx: RequestContext,
                     api_key: str | None, headers: Mapping[str, str] | None = None, *,
                     key_id: str | None = None) -> ChatOutcome:
        ctx.stream = request.stream
        texts = [m.text() for m in request.messages]
        ctx.prompt = redact_prompt("\n".join(texts), self.prompt_log_mode)  # type: ignore[arg-type]
        model, rag_options = resolve_rag_options(
            request.model, (request.model_extra or {}).get("rag"), self.rag_settings)
        route = self.router.resolve(model)
        worst = (await self._worst_case(route, request) if route is not None
                 else WorstCase(tokens=0, cost_usd=0.0, prompt_tokens=0))
        principal = await self.admit(ctx, api_key=api_key, key_id=key_id, model=model,
                                     model_known=route is not None, worst=worst)
        assert route is not None  # admit answered 404 otherwise
        try:
            return await self._admitted(request, ctx, headers or {}, principal, route,
                                        rag_options, worst)
        except ApiError as error:
            await self._settle_failure(ctx, error.status, error.code)
            raise
        except asyncio.CancelledError:
            # The client went away while we waited (non-streaming): what the target did
            # still costs; the row is written off this (cancelled) task.
            self._charge_prompt(ctx)
            ctx.error_code = ctx.error_code or "client_disconnected"
            self.settle_in_background(ctx, 499)
            raise
        except Exception as exc:
            logger.exception("chat pipeline failed for %s", ctx.request_id)
            await self._settle_failure(ctx, 500, "internal_error")
            raise ApiError(500, "Internal error; the request id identifies it in the logs.",
                           code="internal_error") from exc

    async def _worst_case(self, route: Any, request: ChatCompletionRequest) -> WorstCase:
        """Counting a long prompt with real tokenizers takes a while (~0.8 s for 240k
        characters here): large ones are counted off the event loop."""
        size = sum(len(m.text()) for m in request.messages)
        if size < INLINE_COUNT_CHARS and not request.tools:
            return self.router.worst_case(route, request)
        return await asyncio.to_thread(self.router.worst_case, route, request)

    async def _settle_failure(self, ctx: RequestContext, status: int,
                              code: str | None) -> None:
        ctx.error_code = code
        if ctx.extra.get("target") is None:  # nothing was generated
            ctx.tokens_in = ctx.tokens_out = 0
            ctx.cost_usd = 0.0
        await self.settle(ctx, status)

    async def _admitted(self, request: ChatCompletionRequest, ctx: RequestContext,
                        headers: Mapping[str, str], principal: dict[str, Any],
                        route: Any, rag_options: Any, worst: WorstCase) -> ChatOutcome:
        rag: RagContext | None = None
        step = await self.cache.lookup(request.model_dump(), headers, principal, ctx)
        if step is not None and step.hit is not None:
            outcome = self._answer_from_cache(request, ctx, step)
        else:
            if rag_options is not None:
                rag = await self._retrieve(request, rag_options.model_dump(), ctx, step)
                request = ChatCompletionRequest.model_validate(
                    {**request.model_dump(exclude_none=True), "messages": rag.messages})
                await self._reserve_context(ctx, route, request, worst)
            started = time.perf_counter()
            messages = [m.model_dump() for m in request.messages]
            allowed = principal.get("allowed_models")
            decision = await self.router.decide(
                route, messages, _reusable_vector(step, routing_text(messages)),
                principal.get("route_overrides"), allowed, tenant=ctx.tenant)
            ctx.stage("route", started)
            ctx.tier = decision.tier
            outcome = await self._generate(request, ctx, decision, step, rag)
        outcome.headers.update(cache_headers(ctx, step))
        if rag is not None and rag.header:
            outcome.headers["x-rag-sources"] = rag.header
        if outcome.stream is None:
            if rag is not None and outcome.body is not None:
                outcome.body["sources"] = rag.sources
            if ctx.cache == "hit":
                # A hit costs $0 and reserved nothing that others wait for: its row joins
                # the next group commit without the answer waiting for the fsync.
                self._begin_settle(ctx, 200)
            else:
                await self.settle(ctx, 200)
            if step is not None and step.hit is None and outcome.body is not None:
                self._in_background(self._store(ctx, step, outcome.body, rag))
        return outcome

    async def _reserve_context(self, ctx: RequestContext, route: Any,
                               request: ChatCompletionRequest, before: WorstCase) -> None:
        """Retrieved context is part of the prompt: reserve it too, before generating."""
        after = await self._worst_case(route, request)
        ctx.extra["prompt_tokens_estimate"] = after.prompt_tokens
        extra_tokens = after.tokens - before.tokens
        extra_cost = after.cost_usd - before.cost_usd
        if self.accounting is None or not ctx.admitted or (extra_tokens <= 0
                                                            and extra_cost <= 0):
            return
        assert ctx.key_id is not None
        await self.accounting.extend(ctx.request_id, ctx.key_id, max(0, extra_tokens),
                                     max(0.0, extra_cost))

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
        """Relay chunks as SSE; record usage before [DONE]; store the answer if cacheable.
        However the stream ends (finished, failed, client gone at any chunk, never
        started), the request is settled once: here, or by the HTTP edge."""
        started = time.perf_counter()
        collected: list[dict[str, Any]] = []
        content_chunks = 0
        usage_seen = ctx.cache == "hit"
        failed: ApiError | None = None
        try:
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
                raise
            except Exception:
                logger.exception("stream relay failed for %s", ctx.request_id)
                failed = ApiError(500, "Internal error while streaming.", code="internal_error")
            ctx.stage("stream", started)
            if failed is not None:
                ctx.error_code = failed.code
                if not usage_seen:
                    self._account_partial(ctx, content_chunks)
            try:
                if failed is None and ctx.cache == "hit":
                    self._begin_settle(ctx, 200)  # $0: not worth an fsync wait
                else:
                    await self.settle(ctx, failed.status if failed else 200)
            except ApiError as error:
                failed = failed or error
            if failed is not None:
                yield sse_error(failed.status, failed.message, failed.code)
            elif step is not None and step.hit is None:
                body = completion_from_chunks(collected)
                if body is not None:
                    self._in_background(self._store(ctx, step, body, rag))
            yield DONE
        finally:
            if not ctx.settled:
                # Client went away (or the relay was closed early): what was generated
                # still costs; the row is written in a task the disconnect cannot cancel.
                if not usage_seen:
                    self._account_partial(ctx, content_chunks)
                ctx.error_code = ctx.error_code or "client_disconnected"
                self.settle_in_background(ctx, 499)

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

    def _in_background(self, work: Awaitable[Any], *, quiet: bool = True) -> asyncio.Future[Any]:
        """Work no caller may cancel (settlement) or need wait for (cache stores): kept
        referenced until done; failures are logged (and, unless quiet, re-raised to an
        awaiting caller)."""
        # A fresh context: Ray Serve cancels the handle calls an ingress request made
        # when that request is cancelled (its client left); settlement must not be one of
        # them. Nothing else of the request's context is needed here.
        task = asyncio.get_running_loop().create_task(work, context=contextvars.Context())
        self._tasks.add(task)

        def done(finished: asyncio.Future[Any]) -> None:
            self._tasks.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                error = finished.exception()
                level = logging.WARNING if isinstance(error, ApiError) else logging.ERROR
                logger.log(level, "background step failed: %r", error)

        task.add_done_callback(done)
        return task

    async def drain(self) -> None:
        """Wait for settlements and stores in flight (replica shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ------------------------------------------------------------------ usage
    def _charge_prompt(self, ctx: RequestContext) -> None:
        """A request cut off before its usage arrived: the prompt was processed."""
        if ctx.extra.get("target") is not None and not ctx.tokens_in:
            self._account(ctx, {"prompt_tokens": ctx.extra.get("prompt_tokens_estimate", 0),
                                "completion_tokens": 0})

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


def _refuse_unusable_key(api_key: str | None, auth_required: bool) -> None:
    """A missing or malformed key is refused here, without a call to the Quota service
    (the same answers it would give)."""
    reason = None
    if api_key is None:
        reason = "missing" if auth_required else None
    elif parse_key_id(api_key) is None:
        reason = "unknown"
    if reason is not None:
        message, code = AUTH_MESSAGES[reason]
        raise ApiError(401, message, code=code)


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
