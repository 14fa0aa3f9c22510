"""Gateway: a thin shell. Route mixins parse requests and shape responses; the pipeline
(serve_app.chat_service, built by deployments.chat_pipeline) does the work; services are
reached through handles."""
from __future__ import annotations

import uuid
from typing import Any

from fastapi import Request
from ray import serve

from deployments.chat_pipeline import ServeChatPipeline
from deployments.gateway.admin_routes import AdminRoutes
from deployments.gateway.agent_routes import AgentRoutes
from deployments.gateway.cache_routes import CacheRoutes
from deployments.gateway.fastapi_app import api_key_of, app
from deployments.gateway.openai_routes import OpenAIRoutes
from deployments.gateway.rag_routes import RagRoutes
from serve_app.address_gate import AddressGate
from serve_app.chat_service import ChatService
from serve_app.errors import ApiError
from serve_app.handles import AgentClient, LocalLLMClient
from serve_app.http_edge import context_of, register_edge_hooks
from serve_app.readiness import CachedReadiness
from serve_app.request_context import RequestContext, RequestLogger
from serve_app.settings import StackAppSettings


@serve.deployment(name="Gateway", max_ongoing_requests=128)
@serve.ingress(app)
class Gateway(OpenAIRoutes, AdminRoutes, CacheRoutes, RagRoutes, AgentRoutes):
    def __init__(self, settings: dict[str, Any], quota: Any, cache: Any,
                 retriever: Any, classifier: Any, remote: Any, agent: Any) -> None:
        self.settings = StackAppSettings.model_validate(settings)
        self.pipeline = ServeChatPipeline(self.settings, quota=quota, cache=cache,
                                          retriever=retriever, classifier=classifier,
                                          remote=remote)
        # What the route modules use, from the one pipeline.
        self.llm, self.embedder = self.pipeline.llm, self.pipeline.embedder
        self.quota, self.cache = self.pipeline.quota, self.pipeline.cache
        self.retriever, self.metrics = self.pipeline.retriever, self.pipeline.metrics
        self.accounting = self.quota if self.settings.quota.enabled else None
        self.request_log = RequestLogger(self.settings.data_dir / "logs")
        agent_settings = self.settings.agent
        self.agent = AgentClient(
            agent, timeout_s=self.settings.gateway.request_timeout_s,
            long_timeout_s=agent_settings.max_budgets.wall_clock_s
            + agent_settings.sandbox.wall_seconds + 60)
        self.readiness = CachedReadiness(self._probe_ready,
                                         self.settings.gateway.readiness_cache_s)
        register_edge_hooks(max_body_bytes=self.settings.gateway.max_body_bytes,
                            max_upload_bytes=self.settings.gateway.max_upload_bytes,
                            on_complete=self.finish_request,
                            gate=self._address_gate())

    def _address_gate(self) -> AddressGate | None:
        """Only where keys are required: without them every request is 'unauthenticated'
        and the gate would limit legitimate traffic."""
        quota = self.settings.quota
        if not (quota.enabled and quota.auth_required):
            return None
        return AddressGate(self.settings.gateway.unauthenticated_per_minute)

    async def models(self) -> dict[str, dict[str, Any]]:
        return await self.pipeline.models()

    @property
    def chat(self) -> ChatService:
        """The pipeline; built once the local model's name is known (models())."""
        return self.pipeline.service

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return await self.pipeline.embed(texts)

    async def authenticate(self, request: Request) -> dict[str, Any]:
        if self.accounting is None:
            return {"tenant_id": "anonymous", "key_id": "anonymous", "can_confirm": False}
        principal = await self.quota.call("authenticate", api_key_of(request))
        context = context_of(request)
        context.tenant = principal["tenant_id"]
        context.key_id = principal["key_id"]
        return principal

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

    async def __del__(self) -> None:
        """Serve calls this on graceful shutdown (downscaling, redeploys): usage rows and
        releases still being written finish before the replica goes."""
        await self.pipeline.drain()

    def finish_request(self, context: RequestContext) -> None:
        self.pipeline.settle_leftover(context)
        route = context.route if context.route.startswith(("/v1/", "/admin/")) else "other"
        self.metrics.requests.inc(tags={"route": route, "status": str(context.status)})
        self.metrics.latency.observe(context.elapsed_ms() / 1000, tags={"route": route})
        self.request_log.write(context)
