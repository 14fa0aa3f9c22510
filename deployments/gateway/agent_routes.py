"""Agent sessions over HTTP. A session belongs to the key that created it (in its tenant);
other keys need a grant from the creator (POST .../grants). Its LLM steps run through the
same routing and accounting path as chat, each admitted under the key that drives the run
(its models, limits, budget). Only keys allowed to confirm (or the admin key) can approve
an irreversible tool call, and not one their own run asked for unless their policy says
so. Every check is made in the AgentRunner from the caller's principal passed here."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from deployments.gateway.dependencies import AdminDep, CallerDep, GatewayDep
from serve_app.agent.sessions import STATUSES
from serve_app.errors import ApiError

PREFIX = "/v1/agent/sessions"
router = APIRouter()


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json() if await request.body() else {}
    except ValueError as exc:
        raise ApiError(400, "The request body is not valid JSON.", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


@router.post(PREFIX, status_code=201)
async def agent_create(request: Request, gateway: GatewayDep,
                       caller: CallerDep) -> JSONResponse:
    """Body: {system_prompt?, goal?, tools?: [names], budgets?: {wall_clock_s,
    max_llm_calls, max_tool_calls, max_tokens, max_usd}, model?, metadata?:
    {collection?}}. The calling key owns the session (the admin key owns none)."""
    if caller.admin:
        raise ApiError(403, "A session belongs to a tenant's key; create it with one.",
                       code="tenant_key_required")
    view = await gateway.agent.call("create_session", await _json(request), caller.tenant_id,
                                    caller.principal())
    return JSONResponse(view, status_code=201)


@router.post(PREFIX + "/{session_id}/messages")
async def agent_message(session_id: str, request: Request, gateway: GatewayDep,
                        caller: CallerDep) -> dict[str, Any]:
    """Runs the loop until the answer, a budget stop or a pending confirmation; its LLM
    steps are admitted under the calling key (the creator or a key granted drive)."""
    return await gateway.agent.call("post_message", session_id, await _json(request),
                                    caller.tenant_id, caller.principal(), long=True)


@router.get(PREFIX + "/{session_id}")
async def agent_get(session_id: str, gateway: GatewayDep, caller: CallerDep) -> dict[str, Any]:
    return await gateway.agent.call("get", session_id, caller.tenant_id, caller.principal())


@router.get(PREFIX + "/{session_id}/audit")
async def agent_audit(session_id: str, gateway: GatewayDep,
                      caller: CallerDep) -> dict[str, Any]:
    return await gateway.agent.call("audit", session_id, caller.tenant_id, caller.principal())


@router.post(PREFIX + "/{session_id}/confirmations/{call_id}")
async def agent_confirm(session_id: str, call_id: str, request: Request, gateway: GatewayDep,
                        caller: CallerDep) -> dict[str, Any]:
    """Body: {"approve": true|false}. Approve runs the call once and resumes."""
    return await gateway.agent.call("confirm_call", session_id, call_id, await _json(request),
                                    caller.principal(), long=True)


@router.post(PREFIX + "/{session_id}/grants")
async def agent_grant(session_id: str, request: Request, gateway: GatewayDep,
                      caller: CallerDep) -> dict[str, Any]:
    """Body: {"key_id": "...", "right": "read"|"drive"|null}. Creator or admin only."""
    return await gateway.agent.call("grant", session_id, await _json(request),
                                    caller.principal())


@router.delete(PREFIX + "/{session_id}")
async def agent_delete(session_id: str, gateway: GatewayDep,
                       caller: CallerDep) -> dict[str, Any]:
    return await gateway.agent.call("delete", session_id, caller.tenant_id, caller.principal())


@router.get("/v1/agent/confirmations")
async def agent_pending_confirmations(gateway: GatewayDep, caller: CallerDep,
                                      limit: Annotated[int, Query(ge=1, le=500)] = 100
                                      ) -> dict[str, Any]:
    """Calls waiting for a human that the caller may decide (a can_confirm key: its
    tenant's; the admin key: every tenant's), each with the exact tool call."""
    data = await gateway.agent.call("pending_confirmations", caller.principal(), limit)
    return {"object": "list", "data": data}


@router.get("/admin/v1/agent/sessions")
async def agent_list_sessions(gateway: GatewayDep, admin: AdminDep,
                              tenant: Annotated[str | None, Query(max_length=128)] = None,
                              status: Literal[STATUSES] | None = None,  # type: ignore[valid-type]
                              limit: Annotated[int, Query(ge=1, le=500)] = 100
                              ) -> dict[str, Any]:
    """Sessions of every tenant (or one), newest first, with budgets used and pending
    confirmations; messages are in GET /v1/agent/sessions/{id}."""
    data = await gateway.agent.call("list_sessions", {
        "tenant": tenant, "status": status, "limit": limit}, admin.principal())
    return {"object": "list", "data": data}


@router.get("/admin/v1/agent/audit/verify")
async def agent_verify_audit(gateway: GatewayDep, admin: AdminDep) -> dict[str, Any]:
    """Recompute the audit log's hash chain; names the first broken row."""
    return await gateway.agent.call("verify_audit_chain")
