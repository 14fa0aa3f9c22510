"""AgentRunner: agent sessions (loop, tools, confirmations, sandbox, audit) behind a handle.
Thin shell over serve_app.agent.runner.AgentService; every method returns a JSON-able dict
or an `ApiError` payload (never raises across the handle).

Arguments (bound in the app builder):
- settings: the stack settings (validated once in the app builder; a dict is validated
  here); `data_dir` and the `agent` section are used.
- llm: optional object with `async complete(request_dict) -> completion dict` or a
  DeploymentHandle with a `complete` method (the chat routing/accounting path). Without it,
  `agent.llm_base_url` (an OpenAI-compatible server) is used.
- retriever: optional DeploymentHandle with `search(query, top_k) -> list[dict]`.

Callers pass the principal (the gateway's caller dict: tenant_id, key_id, can_confirm,
can_self_confirm, admin) as the last argument: sessions belong to their creating key and
every check (grants, confirmation policy, the key an LLM step is admitted under) is made
here from it. `owner` (a tenant id) alone is the older, tenant-wide form.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ray import serve

from deployments.chat_pipeline import PipelineLLMPort, ServeChatPipeline
from deployments.handles import call_handle
from deployments.metrics import AgentMetrics
from serve_app.agent.access import Principal
from serve_app.agent.config import AgentSettings
from serve_app.agent.events import AgentEvents
from serve_app.agent.llm_port import LLMPort, OpenAICompatibleLLM
from serve_app.agent.protocol import (ConfirmRequest, CreateSessionRequest, GrantRequest,
                                      PostMessageRequest, parse)
from serve_app.agent.runner import AgentService
from serve_app.agent.sandbox import SandboxUnavailable
from serve_app.errors import ApiError, error_boundary
from serve_app.gateway.request_context import RequestLogger
from serve_app.settings import StackAppSettings

logger = logging.getLogger(__name__)


class _Unwired:
    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        raise ApiError(503, "The agent has no model configured (agent.llm_base_url).",
                       code="service_unavailable")


def _port(llm: Any, settings: AgentSettings) -> LLMPort:
    if llm is not None:
        return llm
    if settings.llm_base_url:
        return OpenAICompatibleLLM(settings.llm_base_url, api_key_env=settings.llm_api_key_env,
                                   timeout_s=settings.llm_timeout_s)
    return _Unwired()


def _principal(data: dict[str, Any]) -> Principal:
    principal = Principal.from_wire(data)
    if principal is None:
        raise ApiError(401, "This call needs a caller.", code="missing_api_key")
    return principal


def _retrieve(retriever: Any) -> Callable[..., Awaitable[list[dict[str, Any]]]] | None:
    """The retrieve tool over the Retriever deployment: the session owner's collection
    named in the session's metadata (`collection`, default "default")."""
    if retriever is None:
        return None

    async def search(query: str, top_k: int, owner: str | None,
                     metadata: dict[str, Any]) -> list[dict[str, Any]]:
        result = await call_handle(retriever.search.remote(
            owner or "", metadata.get("collection") or "default", query, top_k), 60.0,
            "The retriever", "retriever_unavailable")
        return [{"source_id": c.get("source_id"), "title": c.get("title"),
                 "score": c.get("score"), "text": c.get("text")} for c in result]

    return search


@serve.deployment(name="AgentRunner", max_ongoing_requests=64)
@error_boundary("agent", code="agent_error", status=500)
class AgentRunner:
    def __init__(self, settings: dict[str, Any], llm: Any = None, retriever: Any = None,
                 quota: Any = None, cache: Any = None, classifier: Any = None) -> None:
        stack = StackAppSettings.model_validate(settings)
        agent_settings = stack.agent
        self._pipeline: ServeChatPipeline | None = None
        if llm is None and quota is not None:
            # The agent's LLM steps run through its own copy of the chat pipeline (routing,
            # cache, accounting under the driving key): no call back into the Gateway.
            pipeline = ServeChatPipeline(stack, quota=quota, cache=cache,
                                         retriever=retriever, classifier=classifier)
            llm = PipelineLLMPort(pipeline, RequestLogger(stack.data_dir / "logs"))
            self._pipeline = pipeline
        self.service = AgentService(agent_settings, stack.data_dir,
                                    _port(llm, agent_settings), retrieve=_retrieve(retriever),
                                    database_url=stack.database.url(),
                                    events=AgentEvents(AgentMetrics()))
        try:
            self.service.sandbox.check()
        except SandboxUnavailable as error:  # the python tool will answer with this reason
            logger.warning("agent sandbox unavailable: %s", error)

    async def __del__(self) -> None:
        """Graceful shutdown: usage rows of the sessions' LLM steps finish being written;
        MCP connections close (stdio servers are this replica's child processes)."""
        if self._pipeline is not None:
            await self._pipeline.drain()
        await self.service.close_connections()

    async def create_session(self, body: dict[str, Any], owner: str | None,
                             principal: dict[str, Any] | None = None) -> dict[str, Any]:
        request = parse(CreateSessionRequest, body)
        return await self.service.create_session(
            owner=owner, principal=Principal.from_wire(principal), **request.model_dump())

    async def post_message(self, session_id: str, body: dict[str, Any], owner: str | None,
                           principal: dict[str, Any] | None = None) -> dict[str, Any]:
        request = parse(PostMessageRequest, body)
        return await self.service.post_message(session_id, request.content, owner=owner,
                                               principal=Principal.from_wire(principal))

    async def get(self, session_id: str, owner: str | None,
                  principal: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.service.get(session_id, owner=owner,
                                      principal=Principal.from_wire(principal))

    async def audit(self, session_id: str, owner: str | None,
                    principal: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.service.audit(session_id, owner=owner,
                                        principal=Principal.from_wire(principal))

    async def list_sessions(self, query: dict[str, Any],
                            principal: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.service.list_sessions(_principal(principal), **query)

    async def pending_confirmations(self, principal: dict[str, Any],
                                    limit: int = 100) -> list[dict[str, Any]]:
        return await self.service.pending_confirmations(_principal(principal), limit)

    async def confirm(self, session_id: str, call_id: str, body: dict[str, Any], *,
                      confirmer: str | None = None, may_confirm: bool = False,
                      owner: str | None = None,
                      principal: dict[str, Any] | None = None) -> dict[str, Any]:
        request = parse(ConfirmRequest, body)
        return await self.service.confirm(session_id, call_id, approve=request.approve,
                                          confirmer=confirmer, may_confirm=may_confirm,
                                          owner=owner,
                                          principal=Principal.from_wire(principal))

    async def confirm_call(self, session_id: str, call_id: str, body: dict[str, Any],
                           principal: dict[str, Any]) -> dict[str, Any]:
        """confirm() for the gateway: the confirmer and its policy come from the principal."""
        return await self.confirm(session_id, call_id, body, principal=principal)

    async def grant(self, session_id: str, body: dict[str, Any],
                    principal: dict[str, Any]) -> dict[str, Any]:
        request = parse(GrantRequest, body)
        return await self.service.grant(session_id, request.key_id, request.right,
                                        principal=Principal.from_wire(principal))

    async def delete(self, session_id: str, owner: str | None,
                     principal: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.service.delete(session_id, owner=owner,
                                         principal=Principal.from_wire(principal))

    def verify_audit_chain(self) -> dict[str, Any]:
        broken = self.service.verify_audit_chain()
        return {"valid": broken is None, "first_broken": broken,
                "head": self.service.audit_log.head()}
