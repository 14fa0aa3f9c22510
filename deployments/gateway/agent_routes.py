"""Agent sessions over HTTP. A session belongs to the key that created it (in its tenant);
other keys need a grant from the creator (POST .../grants). Its LLM steps run through the
same routing and accounting path as chat, each admitted under the key that drives the run
(its models, limits, budget). Only keys allowed to confirm (or the admin key) can approve
an irreversible tool call, and not one their own run asked for unless their policy says
so. Every check is made in the AgentRunner from the principal passed here."""
from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from deployments.gateway.fastapi_app import api_key_of, app
from serve_app.errors import ApiError
from serve_app.http_edge import context_of

PREFIX = "/v1/agent/sessions"


class AgentRoutes:
    async def _caller(self, request: Request) -> dict[str, Any]:
        """The principal; the admin key acts across tenants and may confirm."""
        token = api_key_of(request)
        if token and await self.quota.call("is_admin", token):
            context_of(request).extra["admin"] = True
            return {"tenant_id": None, "key_id": "admin", "can_confirm": True, "admin": True}
        return _principal(await self.authenticate(request))

    async def _json(self, request: Request) -> dict[str, Any]:
        try:
            body = await request.json() if await request.body() else {}
        except ValueError as exc:
            raise ApiError(400, "The request body is not valid JSON.",
                           code="invalid_json") from exc
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
        return body

    @app.post(PREFIX, status_code=201)
    async def agent_create(self, request: Request) -> JSONResponse:
        """Body: {system_prompt?, goal?, tools?: [names], budgets?: {wall_clock_s,
        max_llm_calls, max_tool_calls, max_tokens, max_usd}, model?, metadata?:
        {collection?}}. The calling key owns the session."""
        caller = _principal(await self.authenticate(request))
        body = await self._json(request)
        view = await self.agent.call("create_session", body, caller["tenant_id"], caller)
        return JSONResponse(view, status_code=201)

    @app.post(PREFIX + "/{session_id}/messages")
    async def agent_message(self, session_id: str, request: Request) -> dict[str, Any]:
        """Runs the loop until the answer, a budget stop or a pending confirmation; its LLM
        steps are admitted under the calling key (the creator or a key granted drive)."""
        caller = await self._caller(request)
        return await self.agent.call("post_message", session_id, await self._json(request),
                                     caller["tenant_id"], caller, long=True)

    @app.get(PREFIX + "/{session_id}")
    async def agent_get(self, session_id: str, request: Request) -> dict[str, Any]:
        caller = await self._caller(request)
        return await self.agent.call("get", session_id, caller["tenant_id"], caller)

    @app.get(PREFIX + "/{session_id}/audit")
    async def agent_audit(self, session_id: str, request: Request) -> dict[str, Any]:
        caller = await self._caller(request)
        return await self.agent.call("audit", session_id, caller["tenant_id"], caller)

    @app.post(PREFIX + "/{session_id}/confirmations/{call_id}")
    async def agent_confirm(self, session_id: str, call_id: str,
                            request: Request) -> dict[str, Any]:
        """Body: {"approve": true|false}. Approve runs the call once and resumes."""
        caller = await self._caller(request)
        return await self.agent.call("confirm_call", session_id, call_id,
                                     await self._json(request), caller, long=True)

    @app.post(PREFIX + "/{session_id}/grants")
    async def agent_grant(self, session_id: str, request: Request) -> dict[str, Any]:
        """Body: {"key_id": "...", "right": "read"|"drive"|null}. Creator or admin only."""
        caller = await self._caller(request)
        return await self.agent.call("grant", session_id, await self._json(request), caller)

    @app.delete(PREFIX + "/{session_id}")
    async def agent_delete(self, session_id: str, request: Request) -> dict[str, Any]:
        caller = await self._caller(request)
        return await self.agent.call("delete", session_id, caller["tenant_id"], caller)

    @app.get("/admin/v1/agent/audit/verify")
    async def agent_verify_audit(self, request: Request) -> dict[str, Any]:
        """Recompute the audit log's hash chain; names the first broken row."""
        await self.require_admin(request)
        return await self.agent.call("verify_audit_chain")


def _principal(caller: dict[str, Any]) -> dict[str, Any]:
    """What the AgentRunner needs of an authenticated key, and nothing the client sent."""
    return {"tenant_id": caller.get("tenant_id"), "key_id": caller.get("key_id"),
            "can_confirm": bool(caller.get("can_confirm")),
            "can_self_confirm": bool(caller.get("can_self_confirm")),
            "admin": bool(caller.get("admin"))}
