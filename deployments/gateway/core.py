"""Gateway: a thin shell. Route mixins parse requests and shape responses; the pipeline
(serve_app.chat_service) does the work; services are reached through handles."""
from __future__ import annotations

import uuid
from typing import Any

from fastapi import Request
from ray import serve

from deployments.gateway.admin_routes import AdminRoutes
from deployments.gateway.agent_routes import AgentRoutes
from deployments.gateway.cache_routes import CacheRoutes
from deployments.gateway.fastapi_app import api_key_of, app
from deployments.gateway.openai_routes import OpenAIRoutes
from deployments.gateway.rag_routes import RagRoutes
from serve_app.chat_builder import ChatPorts, build_chat_service, local_info_defaults
from serve_app.chat_service import ChatService
from serve_app.errors import ApiError
from serve_app.handles import (
    AgentClient,
    CacheClient,
    LazyHandle,
    LocalLLMClient,
    QuotaClient,
    RemoteClient,
    RetrieverClient,
)
from serve_app.address_gate import AddressGate
from serve_app.http_edge import context_of, register_edge_hooks
from serve_app.llm.prompt import LocalPromptTokenizer
from serve_app.llm.token_count import LocalCounter
from serve_app.routing.load import LocalLoad
from serve_app.readiness import CachedReadiness
import asyncio
import logging

from serve_app.metrics import serve_metrics
from serve_app.request_context import RequestContext, RequestLogger
from serve_app.routing.chains import TargetCalls
from serve_app.settings import StackAppSettings


@serve.deployment(name="Gateway", max_ongoing_requests=128)
@serve.ingress(app)
class Gateway(OpenAIRoutes, AdminRoutes, CacheRoutes, RagRoutes, AgentRoutes):
    def __init__(self, settings: dict[str, Any], quota: Any, cache: Any,
                 retriever: Any, classifier: Any, remote: Any, agent: Any) -> None:
        self.settings = StackAppSettings.model_validate(settings)
        models_app = self.settings.models_app
        self.llm = LazyHandle("LocalLLM", models_app)
        self.embedder = LazyHandle("Embedder", models_app)
        self.quota = QuotaClient(quota, settle_retry_s=self.settings.quota.settle_retry_s)
        self.accounting = self.quota if self.settings.quota.enabled else None
        self.cache = CacheClient(cache)
        self.retriever = RetrieverClient(
            retriever, timeout_s=self.settings.gateway.request_timeout_s,
            ingest_timeout_s=self.settings.gateway.ingest_timeout_s)
        self.metrics = serve_metrics()
        self.request_log = RequestLogger(self.settings.data_dir / "logs")
        self.classifier = classifier
        agent_settings = self.settings.agent
        self.agent = AgentClient(
            agent, timeout_s=self.settings.gateway.request_timeout_s,
            long_timeout_s=agent_settings.max_budgets.wall_clock_s
            + agent_settings.sandbox.wall_seconds + 60)
        self.remote = RemoteClient(remote, timeout_s=self.settings.gateway.request_timeout_s)
        self._model_info: dict[str, dict[str, Any]] = {}
        self._chat: ChatService | None = None
        self.local_counter = LocalCounter()
        self.readiness = CachedReadiness(self._probe_ready,
                                         self.settings.gateway.readiness_cache_s)
        register_edge_hooks(max_body_bytes=self.settings.gateway.max_body_bytes,
                            max_upload_bytes=self.settings.gateway.max_upload_bytes,
                            on_complete=self.finish_request,
                            gate=AddressGate(self.settings.gateway.unauthenticated_per_minute))

    # ------------------------------------------------------------------ wiring
    async def models(self) -> dict[str, dict[str, Any]]:
        if not self._model_info:
            timeout = self.settings.gateway.readiness_probe_timeout_s
            llm = await self.llm.call("model_info", timeout_s=timeout)
            embedder = await self.embedder.call("model_info", timeout_s=timeout)
            await self._load_local_tokenizer(timeout)
            self._model_info = {"chat": llm, "embedding": embedder}
        return self._model_info

    async def _load_local_tokenizer(self, timeout: float) -> None:
        """Reservations count the local model's prompts with its own tokenizer; until it
        is here they use the byte bound (larger, never smaller)."""
        if self.local_counter.exact is not None:
            return
        try:
            files = await self.llm.call("tokenizer_files", timeout_s=timeout)
            self.local_counter.exact = await asyncio.to_thread(LocalPromptTokenizer, files)
        except Exception:
            logging.getLogger(__name__).warning(
                "local tokenizer unavailable; reservations use the byte bound", exc_info=True)

    @property
    def chat(self) -> ChatService:
        """The pipeline; built once the local model's name is known (models())."""
        if self._chat is None:
            self._chat = self._build_chat(self._model_info["chat"])
        return self._chat

    def _build_chat(self, local_info: dict[str, Any]) -> ChatService:
        local = LocalLLMClient(self.llm, self.settings.gateway.request_timeout_s)
        ports = ChatPorts(
            local=TargetCalls(local.complete, local.stream), remote=self.remote.target_calls,
            classify=self._classify, embed=self.embed, accounting=self.quota,
            cache=self.cache, retriever=self.retriever, local_counter=self.local_counter,
            local_load=LocalLoad(self.settings.router.local.max_running_requests,
                                 poll=self._local_running),
            on_tokens=self._count_tokens,
            on_ttft=lambda model, s: self.metrics.ttft.observe(
                s, tags={"gen_ai_request_model": model}))
        return build_chat_service(self.settings, ports, **local_info_defaults(local_info))

    async def _local_running(self) -> int:
        """Requests running in a LocalLLM replica's engine (load-aware routing polls it)."""
        return int(await self.llm.call("running_requests", timeout_s=2.0))

    async def _classify(self, text: str, vector: list[float],
                        thresholds: dict[str, float] | None) -> dict[str, Any]:
        try:
            return await self.classifier.classify.remote(text, vector, thresholds)
        except Exception as exc:  # the router falls back to a safe tier
            raise ApiError(503, "classifier unavailable", code="classifier_unavailable") from exc

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return await self.embedder.call("embed", texts,
                                        timeout_s=self.settings.gateway.request_timeout_s)

    async def authenticate(self, request: Request) -> dict[str, Any]:
        if self.accounting is None:
            return {"tenant_id": "anonymous", "key_id": "anonymous", "can_confirm": False}
        principal = await self.quota.call("authenticate", api_key_of(request))
        context = context_of(request)
        context.tenant = principal["tenant_id"]
        context.key_id = principal["key_id"]
        return principal

    def _count_tokens(self, model: str, tokens_in: int, tokens_out: int) -> None:
        for kind, count in (("input", tokens_in), ("output", tokens_out)):
            if count > 0:  # Ray counters refuse an increment of 0
                self.metrics.tokens.inc(count, tags={"gen_ai_request_model": model,
                                                     "gen_ai_token_type": kind})

    async def _probe_ready(self) -> dict[str, Any]:
        """One real generation on the local model (CachedReadiness calls it sparingly)."""
        probe: dict[str, Any] = {"messages": [{"role": "user", "content": "ping"}],
                                 "max_tokens": 1, "temperature": 0}
        try:
            models = await self.models()
            probe["model"] = models["chat"]["id"]
            await LocalLLMClient(self.llm, self.settings.gateway.readiness_probe_timeout_s
                                 ).complete(probe, f"readyz-{uuid.uuid4().hex}")
        except ApiError as error:
            return {"ready": False, "reason": error.message}
        return {"ready": True, "model": probe["model"]}

    def finish_request(self, context: RequestContext) -> None:
        if context.admitted and not context.settled and self._chat is not None:
            # Admitted but never settled (a stream its client left before it started):
            # the edge settles it, so no reservation leaks and no row is lost.
            self._chat.settle_in_background(context, context.status)
        route = context.route if context.route.startswith(("/v1/", "/admin/")) else "other"
        self.metrics.requests.inc(tags={"route": route, "status": str(context.status)})
        self.metrics.latency.observe(context.elapsed_ms() / 1000, tags={"route": route})
        self.request_log.write(context)
