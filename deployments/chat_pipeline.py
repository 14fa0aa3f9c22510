"""The chat pipeline over deployment handles, for every deployment that runs it.

The Gateway (HTTP requests) and the AgentRunner (its sessions' LLM steps) each build the
same pipeline (`serve_app.gateway.builder.build_chat_service`) with ports over the same
deployments, so an agent step no longer calls back into the Gateway. Ray code; the
pipeline itself is Ray-free.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import ValidationError

from serve_app.gateway.builder import ChatPorts, build_chat_service, local_info_defaults
from serve_app.gateway.chat_service import ChatService
from serve_app.errors import ApiError
from deployments.handles import (
    CacheClient,
    LazyHandle,
    LocalLLMClient,
    QuotaClient,
    RetrieverClient,
    call_handle,
)
from serve_app.llm.prompt import LocalPromptTokenizer
from serve_app.llm.token_count import LocalCounter
from deployments.metrics import serve_metrics
from serve_app.protocol import ChatCompletionRequest
from serve_app.gateway.request_context import RequestContext, RequestLogger, new_request_id
from serve_app.routing.chains import TargetCalls
from serve_app.routing.remote import RemoteProviders
from serve_app.routing.load import LocalLoad
from serve_app.settings import StackAppSettings

logger = logging.getLogger(__name__)


class ServeChatPipeline:
    def __init__(self, settings: StackAppSettings, *, quota: Any, cache: Any, retriever: Any,
                 classifier: Any) -> None:
        self.settings = settings
        gateway = settings.gateway
        self.llm = LazyHandle("LocalLLM", settings.models_app)
        self.embedder = LazyHandle("Embedder", settings.models_app)
        self.quota = QuotaClient(quota, settle_retry_s=settings.quota.settle_retry_s)
        self.cache = CacheClient(cache)
        self.retriever = RetrieverClient(retriever, timeout_s=gateway.request_timeout_s,
                                         ingest_timeout_s=gateway.ingest_timeout_s)
        self.classifier = classifier
        # API providers are called from this process (see serve_app/routing/remote.py).
        self.providers = RemoteProviders(settings.router)
        for note in settings.router.offline_notes():
            logger.warning(note)
        self.metrics = serve_metrics()
        self.local_counter = LocalCounter()
        self.model_info: dict[str, dict[str, Any]] = {}
        self._service: ChatService | None = None

    # ------------------------------------------------------------------ wiring
    async def models(self) -> dict[str, dict[str, Any]]:
        """The local and embedding models' info (fetched once; the models app may come up
        after the stack)."""
        if not self.model_info:
            timeout = self.settings.gateway.readiness_probe_timeout_s
            llm = await self.llm.call("model_info", timeout_s=timeout)
            embedder = await self.embedder.call("model_info", timeout_s=timeout)
            await self._load_local_tokenizer(timeout)
            self.model_info = {"chat": llm, "embedding": embedder}
        return self.model_info

    @property
    def service(self) -> ChatService:
        """The pipeline; built once models() has run."""
        if self._service is None:
            local = LocalLLMClient(self.llm, self.settings.gateway.request_timeout_s)
            ports = ChatPorts(
                local=TargetCalls(local.complete, local.stream),
                remote=self._provider_calls, classify=self.classify, embed=self.embed,
                accounting=self.quota, cache=self.cache, retriever=self.retriever,
                local_counter=self.local_counter,
                local_load=LocalLoad(self.settings.router.local.max_running_requests,
                                     poll=self._local_running),
                on_tokens=self._count_tokens, on_ttft=self._observe_ttft)
            self._service = build_chat_service(self.settings, ports,
                                               **local_info_defaults(self.model_info["chat"]))
        return self._service

    async def _load_local_tokenizer(self, timeout: float) -> None:
        """Reservations count the local model's prompts with its own tokenizer; until it
        is here they use the byte bound (larger, never smaller)."""
        if self.local_counter.exact is not None:
            return
        try:
            files = await self.llm.call("tokenizer_files", timeout_s=timeout)
            self.local_counter.exact = await asyncio.to_thread(LocalPromptTokenizer, files)
        except Exception:
            logger.warning("local tokenizer unavailable; reservations use the byte bound",
                           exc_info=True)

    # ------------------------------------------------------------------ ports
    async def embed(self, texts: list[str]) -> list[list[float]]:
        return await self.embedder.call("embed", texts,
                                        timeout_s=self.settings.gateway.request_timeout_s)

    async def classify(self, text: str, vector: list[float],
                       thresholds: dict[str, float] | None,
                       tenant: str | None = None) -> dict[str, Any]:
        # A failure is an ApiError; the router then falls back to a safe tier.
        return await call_handle(self.classifier.classify.remote(text, vector, thresholds,
                                                                 tenant),
                                 self.settings.gateway.request_timeout_s,
                                 "The router classifier", "classifier_unavailable")

    def _provider_calls(self, provider: str) -> TargetCalls:
        return self.providers.target_calls(provider, self.settings.gateway.request_timeout_s)

    async def _local_running(self) -> int:
        """Requests running in a LocalLLM replica's engine (load-aware routing polls it)."""
        return int(await self.llm.call("running_requests", timeout_s=2.0))

    def _count_tokens(self, model: str, tokens_in: int, tokens_out: int) -> None:
        for kind, count in (("input", tokens_in), ("output", tokens_out)):
            if count > 0:  # Ray counters refuse an increment of 0
                self.metrics.tokens.inc(count, tags={"gen_ai_request_model": model,
                                                     "gen_ai_token_type": kind})

    def _observe_ttft(self, model: str, seconds: float) -> None:
        self.metrics.ttft.observe(seconds, tags={"gen_ai_request_model": model})

    async def drain(self) -> None:
        """Wait for settlements (and cache stores) still in flight."""
        if self._service is not None:
            await self._service.drain()
        self.cache.flush_savings()
        await asyncio.gather(*self.cache.background.tasks, return_exceptions=True)
        await self.providers.aclose()

    def observe(self, context: RequestContext) -> None:
        """A finished request's metrics: time per stage, fallback hops, and the providers'
        breaker states as this replica sees them now."""
        self.metrics.observe_request(context)
        self.metrics.breakers({name: status["state"]
                               for name, status in self.providers.status().items()})

    def settle_leftover(self, context: RequestContext) -> None:
        """Admitted but never settled (a stream its client left before it started):
        settled here, so no reservation leaks and no row is lost."""
        if context.admitted and not context.settled and self._service is not None:
            self._service.settle_in_background(context, context.status)


class PipelineLLMPort:
    """The agent's LLM port: each step runs through the chat pipeline in the AgentRunner
    itself, admitted and charged under the key driving the run (`billing_key_id`, set by
    the runner, never by a client)."""

    def __init__(self, pipeline: ServeChatPipeline, request_log: RequestLogger) -> None:
        self.pipeline = pipeline
        self.request_log = request_log

    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        await self.pipeline.models()
        request = dict(request)
        metadata = request.pop("metadata", None) or {}
        context = RequestContext(request_id=new_request_id(), route="/v1/agent/llm",
                                 method="INTERNAL")
        try:
            body = ChatCompletionRequest.model_validate({**request, "stream": False})
        except ValidationError as exc:
            raise ApiError(400, f"invalid agent LLM request: {exc.errors()[0]['msg']}",
                           code="invalid_request") from None
        try:
            outcome = await self.pipeline.service.handle(
                body, context, None, {}, key_id=metadata.get("billing_key_id") or None)
            context.status = 200
        except ApiError as error:
            context.status = error.status
            raise
        finally:
            self.pipeline.settle_leftover(context)
            self.pipeline.observe(context)
            self.request_log.write(context)
        result = dict(outcome.body or {})
        result["usage"] = {**(result.get("usage") or {}), "cost_usd": context.cost_usd}
        return result
