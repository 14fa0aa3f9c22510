"""The chat completion pipeline, independent of Ray and FastAPI.

admit (auth, model, RPM/TPM/budget reservation) -> generate -> record usage (durably,
before the response is released) -> respond. Each step either returns or raises
`ApiError`; the HTTP edge turns errors into responses. A streamed answer is pulled until
its first item before the response starts, so a request that fails early still gets a
proper status code instead of a broken stream.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from serve_app.cache.config import CacheSettings
from serve_app.cache.policy import CacheDecision, plan_cache
from serve_app.cache.replay import (
    cached_completion,
    completion_chunks,
    completion_from_chunks,
    estimated_saving_usd,
)
from serve_app.errors import ApiError, is_error_payload
from serve_app.handles import LLMClient
from serve_app.protocol import ChatCompletionRequest
from serve_app.quota.pricing import Price, estimate_prompt_tokens
from serve_app.rag.config import RagSettings
from serve_app.rag.prompting import RagContext, apply_rag, resolve_rag_options, sources_header
from serve_app.quota.service import ANONYMOUS
from serve_app.request_context import RequestContext, redact_prompt
from serve_app.sse import DONE, sse_error, sse_event


logger = logging.getLogger(__name__)


class Accounting(Protocol):
    async def admit(self, **kwargs: Any) -> dict[str, Any]: ...

    async def settle(self, row: dict[str, Any]) -> None: ...


class CachePort(Protocol):
    async def lookup(self, tenant: str, decision: dict[str, Any],
                     vector: list[float] | None) -> dict[str, Any]: ...

    def store(self, tenant: str, decision: dict[str, Any], vector: list[float] | None,
              completion: dict[str, Any], source_ids: list[str] | None,
              tier: str | None) -> None: ...

    def record_saving(self, usd: float, model: str) -> None: ...


class RetrieverPort(Protocol):
    async def search(self, tenant: str, options: dict[str, Any], query: str,
                     query_vector: list[float] | None) -> list[dict[str, Any]]: ...

    async def versions_current(self, tenant: str, source_ids: list[str]) -> bool: ...


Embed = Callable[[list[str]], Awaitable[list[list[float]]]]


@dataclass
class CacheStep:
    """The cache's part in one request: the decision and the query vector (reused)."""

    decision: CacheDecision
    vector: list[float] | None = None
    similarity: float | None = None


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
                 cache: CachePort | None = None,
                 cache_settings: CacheSettings | None = None,
                 embed: Embed | None = None,
                 retriever: RetrieverPort | None = None,
                 rag_settings: RagSettings | None = None,
                 prompt_log_mode: str = "off",
                 on_tokens: Callable[[str, int, int], None] | None = None,
                 on_ttft: Callable[[str, float], None] | None = None) -> None:
        self.targets = targets
        self.accounting = accounting
        self.cache = cache if cache_settings is None or cache_settings.enabled else None
        self.cache_settings = cache_settings or CacheSettings(enabled=False)
        self.embed = embed
        self.retriever = retriever
        self.rag_settings = rag_settings or RagSettings()
        self._tasks: set[asyncio.Future[None]] = set()
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
                     api_key: str | None, headers: Mapping[str, str] | None = None
                     ) -> ChatOutcome:
        ctx.stream = request.stream
        texts = [m.text() for m in request.messages]
        ctx.prompt = redact_prompt("\n".join(texts), self.prompt_log_mode)  # type: ignore[arg-type]
        raw = request.model_dump()
        model, rag_options = resolve_rag_options(request.model, raw.get("rag"),
                                                 self.rag_settings)
        known = model in self.targets()
        principal = await self.admit(ctx, api_key=api_key, model=model,
                                     model_known=known, texts=texts,
                                     max_output_tokens=request.output_token_limit(),
                                     price=self.price_of(model))
        rag: RagContext | None = None
        try:
            target = self.resolve(model)
            cache = await self._cache_lookup(raw, headers or {}, principal, ctx)
            assert cache is not None or ctx.cache != "hit"
            if ctx.cache == "hit":
                outcome = self._serve_hit(request, ctx, cache)
            else:
                if rag_options is not None:
                    rag = await self._retrieve(request, rag_options.model_dump(), ctx, cache)
                    request = request.model_copy(update={"messages": rag.messages})
                ctx.model = target.name
                outcome = await self._generate(request, ctx, target, cache, rag)
        except ApiError as error:
            ctx.error_code = error.code
            ctx.tokens_in = ctx.tokens_out = 0
            ctx.cost_usd = 0.0
            await self.record(ctx, error.status)
            raise
        outcome.headers.update(self._cache_headers(ctx, cache))
        if rag is not None and rag.header:
            outcome.headers["x-rag-sources"] = rag.header
        if outcome.stream is None:
            if rag is not None and outcome.body is not None:
                outcome.body["sources"] = rag.sources
            await self.record(ctx, 200)
            if cache is not None and ctx.cache != "hit" and outcome.body is not None:
                self._in_background(self._store(ctx, cache, outcome.body, rag))
        return outcome

    # ------------------------------------------------------------------ retrieval
    async def _retrieve(self, request: ChatCompletionRequest, options: dict[str, Any],
                        ctx: RequestContext, cache: CacheStep | None) -> RagContext:
        if self.retriever is None:
            raise ApiError(400, "Retrieval is not enabled on this deployment.",
                           code="rag_unavailable", param="rag")
        query = next((m.text() for m in reversed(request.messages) if m.role == "user"), "")
        if not query.strip():
            raise ApiError(400, "RAG needs a user message to search with.", param="messages")
        vector = None
        if cache is not None and cache.vector is not None and cache.decision.query_text == query:
            vector = cache.vector  # the cache already embedded this text
        started = time.perf_counter()
        chunks = await self.retriever.search(ctx.tenant or "", options, query, vector)
        ctx.stage("retrieve", started)
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        rag = apply_rag(messages, chunks, self.rag_settings)
        ctx.extra["sources"] = rag.chunk_refs
        ctx.extra["rag_collection"] = options.get("collection")
        return rag

    # ------------------------------------------------------------------ cache
    async def _cache_lookup(self, raw: dict[str, Any], headers: Mapping[str, str],
                            principal: dict[str, Any], ctx: RequestContext) -> CacheStep | None:
        if self.cache is None:
            return None
        decision = plan_cache(raw, headers, self.cache_settings,
                              allow_sampled=bool(principal.get("cache_sampled")))
        if not decision.cacheable:
            ctx.cache = "bypass"
            ctx.extra["cache_reason"] = decision.reason
            return None
        step = CacheStep(decision=decision)
        if decision.semantic and self.embed is not None:
            started = time.perf_counter()
            try:
                step.vector = (await self.embed([decision.query_text]))[0]
            except ApiError:
                step.vector = None  # exact matches still work without the embedder
            ctx.stage("embed", started)
        if not decision.lookup:  # no_cache: skip the lookup, still refresh the entry
            ctx.cache = "bypass"
            ctx.extra["cache_reason"] = decision.reason
            return step
        started = time.perf_counter()
        result = await self.cache.lookup(ctx.tenant or "", decision.to_dict(), step.vector)
        ctx.stage("cache_lookup", started)
        if is_error_payload(result):
            ctx.cache = "miss"  # a broken cache must not break the request
            return step
        step.similarity = result.get("similarity")
        if result.get("hit"):
            ctx.cache = "hit"
            ctx.extra["cache_hit"] = result
        else:
            ctx.cache = "miss"
            ctx.extra["cache_reason"] = result.get("reason")
        return step

    def _serve_hit(self, request: ChatCompletionRequest, ctx: RequestContext,
                   cache: CacheStep) -> ChatOutcome:
        hit = ctx.extra.pop("cache_hit")
        ctx.extra["cache_entry"] = hit.get("entry_id")
        model = hit.get("model") or request.model
        ctx.model = model
        ctx.tier = hit.get("tier")
        ctx.tokens_in = ctx.tokens_out = 0
        ctx.cost_usd = 0.0
        price = self.price_of(model)
        saved = estimated_saving_usd(hit.get("usage"), price.input_per_mtok,
                                     price.output_per_mtok)
        ctx.extra["saved_usd"] = saved
        if saved and self.cache is not None:
            self.cache.record_saving(saved, model)
        headers = {"x-model": model}
        if hit.get("tier"):
            headers["x-route-tier"] = hit["tier"]
        sources = hit["completion"].get("sources")
        if sources:
            headers["x-rag-sources"] = sources_header(
                sources, self.rag_settings.max_sources_header_bytes)
            ctx.extra["sources"] = [s.get("source_id") for s in sources]
        if not request.stream:
            return ChatOutcome(headers=headers, body=cached_completion(hit["completion"]))
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        chunks = completion_chunks(hit["completion"], include_usage=include_usage)
        if sources and chunks:
            chunks[0]["sources"] = sources
        return ChatOutcome(headers=headers, stream=self._replay(chunks, ctx))

    async def _replay(self, chunks: list[dict[str, Any]],
                      ctx: RequestContext) -> AsyncIterator[bytes]:
        ctx.ttft_ms = round((time.perf_counter() - ctx.started) * 1000, 2)
        for chunk in chunks:
            yield sse_event(chunk)
        await self.record(ctx, 200)
        yield DONE

    def _cache_headers(self, ctx: RequestContext, cache: CacheStep | None) -> dict[str, str]:
        headers = {"x-cache": ctx.cache or "bypass"}
        if cache is not None and cache.similarity is not None:
            headers["x-cache-similarity"] = f"{cache.similarity:.4f}"
        if ctx.extra.get("cache_entry"):
            headers["x-cache-entry"] = str(ctx.extra["cache_entry"])
        if ctx.extra.get("cache_reason"):
            headers["x-cache-reason"] = str(ctx.extra["cache_reason"])
        return headers

    async def _store(self, ctx: RequestContext, cache: CacheStep, body: dict[str, Any],
                     rag: RagContext | None) -> None:
        if not cache.decision.store or self.cache is None:
            return
        source_ids = None
        if rag is not None:
            source_ids = rag.source_ids
            body = {**body, "sources": rag.sources}
            # A document replaced while this answer was generated must not be cached
            # under its old version (its invalidation already ran).
            if source_ids and self.retriever is not None and not await \
                    self.retriever.versions_current(ctx.tenant or "", source_ids):
                return
        self.cache.store(ctx.tenant or "", cache.decision.to_dict(), cache.vector, body,
                         source_ids, ctx.tier)

    async def _generate(self, request: ChatCompletionRequest, ctx: RequestContext,
                        target: ModelTarget, cache: CacheStep | None = None,
                        rag: RagContext | None = None) -> ChatOutcome:
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
        if rag is not None:
            first = {**first, "sources": rag.sources}
        return ChatOutcome(headers=headers,
                           stream=self._sse(first, chunks, ctx, include_usage, cache, rag))

    async def _sse(self, first: dict[str, Any], chunks: AsyncIterator[dict[str, Any]],
                   ctx: RequestContext, include_usage: bool,
                   cache: CacheStep | None = None,
                   rag: RagContext | None = None) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        collected: list[dict[str, Any]] = []
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
                if cache is not None:
                    collected.append(chunk)
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
        elif cache is not None:
            body = completion_from_chunks(collected)
            if body is not None:
                self._in_background(self._store(ctx, cache, body, rag))
        yield DONE

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
