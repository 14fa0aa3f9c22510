"""Gateway: the ingress shell. It builds the chat pipeline once (deployments.chat_pipeline
over serve_app.gateway) and holds the clients of the services; the routes (APIRouters in
the *_routes modules) get it and the caller through dependencies.py."""
from __future__ import annotations

import uuid
from typing import Any

from ray import serve

from deployments.chat_pipeline import ServeChatPipeline
from deployments.gateway.console_routes import bind_console
from deployments.gateway.dependencies import bind_gateway
from deployments.gateway.fastapi_app import app
from serve_app.address_gate import AddressGate
from serve_app.gateway.chat_service import ChatService
from serve_app.errors import ApiError
from deployments.handles import AgentClient, LocalLLMClient
from deployments.metrics import RouteLabels
from deployments.http_edge import register_edge_hooks
from serve_app.readiness import CachedReadiness
from serve_app.gateway.request_context import RequestContext, RequestLogger
from serve_app.settings import StackAppSettings

ROUTE_LABELS = RouteLabels(app)  # the metrics' route label: templates, not raw paths


@serve.deployment(name="Gateway", max_ongoing_requests=128)
@serve.ingress(app)
class Gateway:
    def __init__(self, settings: dict[str, Any], quota: Any, cache: Any,
                 retriever: Any, classifier: Any, agent: Any) -> None:
        self.settings = StackAppSettings.model_validate(settings)
        self.pipeline = ServeChatPipeline(self.settings, quota=quota, cache=cache,
                                          retriever=retriever, classifier=classifier)
        # The service clients the routes use, from the one pipeline.
        self.quota, self.cache = self.pipeline.quota, self.pipeline.cache
        self.retriever, self.metrics = self.pipeline.retriever, self.pipeline.metrics
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
        bind_console(self.settings.console, self.settings.data_dir)
        bind_gateway(self)  # what dependencies.gateway_of hands the routes

    def _address_gate(self) -> AddressGate | None:
        """Only where keys are required: without them every request is 'unauthenticated'
        and the gate would limit legitimate traffic."""
        quota = self.settings.quota
        if not (quota.enabled and quota.auth_required):
            return None
        return AddressGate(self.settings.gateway.unauthenticated_per_minute)

    @property
    def chat(self) -> ChatService:
        """The pipeline; built once the local model's name is known (pipeline.models())."""
        return self.pipeline.service

    async def _probe_ready(self) -> dict[str, Any]:
        """One real generation on the local model (CachedReadiness calls it sparingly)."""
        probe: dict[str, Any] = {"messages": [{"role": "user", "content": "ping"}],
                                 "max_tokens": 1, "temperature": 0}
        try:
            models = await self.pipeline.models()
            probe["model"] = models["chat"]["id"]
            await LocalLLMClient(self.pipeline.llm, self.settings.gateway.readiness_probe_timeout_s
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
        self.pipeline.observe(context)
        route = (ROUTE_LABELS(context.route) if context.route.startswith(("/v1/", "/admin/"))
                 else "other")
        self.metrics.requests.inc(tags={"route": route, "status": str(context.status)})
        self.metrics.latency.observe(context.elapsed_ms() / 1000, tags={"route": route})
        self.request_log.write(context)
