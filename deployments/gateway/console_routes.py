"""The operator console (/console): server-rendered pages (Jinja2, htmx, Chart.js served
by the stack itself) over the admin API.

Every page is built from the same HTTP API the CLI uses, called in process (httpx's ASGI
transport into this replica's own app) with the key the operator signed in with: the
console has no data path of its own, and the API's checks (admin only, can_confirm, tenant
scopes) apply unchanged. Sign-in state is a sealed cookie (serve_app.console.session);
every POST needs the session's CSRF token and, when the browser sends one, a same-origin
Origin header. Pages are `no-store` and carry a strict CSP (scripts from /console/static
only).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from deployments.http_edge import context_of
from serve_app.console import charts, forms
from serve_app.console.config import ConsoleSettings
from serve_app.console.session import (LOGIN_COOKIE, SESSION_COOKIE, ConsoleSession,
                                       SessionSealer, new_login_nonce)
from serve_app.errors import ApiError
from serve_app.secrets_store import env_or_generated

CONSOLE_DIR = Path(__file__).resolve().parents[2] / "serve_app" / "console"
STATIC_DIR = CONSOLE_DIR / "static"
PREFIX = "/console"
RANGES_S = {"1h": 3600, "24h": 86_400, "7d": 7 * 86_400, "30d": 30 * 86_400}
INTERVALS_S = {"1h": 60, "24h": 3600, "7d": 6 * 3600, "30d": 86_400}
GROUPS = ("tenant", "key", "model")
SECURITY_HEADERS = {
    "cache-control": "no-store",
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; "
    "base-uri 'none'",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",  # "no-referrer" makes Chrome send Origin: null
    "x-content-type-options": "nosniff",
}

router = APIRouter(prefix=PREFIX, include_in_schema=False)
templates = Jinja2Templates(directory=str(CONSOLE_DIR / "templates"))
templates.env.filters["timestamp"] = lambda epoch: time.strftime(
    "%Y-%m-%d %H:%M:%S", time.gmtime(int(epoch or 0)))


class ConsoleState:
    """What the routes need of this replica (bound by the Gateway's constructor)."""

    settings: ConsoleSettings = ConsoleSettings(enabled=False)
    sealer: SessionSealer | None = None


def bind_console(settings: ConsoleSettings, data_dir: Path) -> None:
    ConsoleState.settings = settings
    if settings.enabled:
        secret = env_or_generated(settings.secret_env, data_dir, "console.key")
        ConsoleState.sealer = SessionSealer(secret, settings.session_ttl_s)


class AdminApi:
    """The admin API, called in process with the signed-in key."""

    def __init__(self, request: Request, api_key: str) -> None:
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=request.app), base_url="http://console.internal",
            headers={"authorization": f"Bearer {api_key}"}, timeout=600)

    async def __aenter__(self) -> "AdminApi":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._client.aclose()

    async def call(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                   body: Any = None) -> Any:
        params = {k: v for k, v in (params or {}).items() if v not in (None, "")}
        response = await self._client.request(method, path, params=params, json=body)
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code >= 400:
            error = (data or {}).get("error", {}) if isinstance(data, dict) else {}
            raise ApiError(response.status_code, str(error.get("message") or "request failed"),
                           code=error.get("code"))
        return data

    async def get(self, path: str, **params: Any) -> Any:
        return await self.call("GET", path, params=params)


# ---------------------------------------------------------------- plumbing

def _sealer() -> SessionSealer:
    if ConsoleState.sealer is None:
        raise ApiError(404, "The console is disabled.", code="not_found")
    return ConsoleState.sealer


def _session(request: Request) -> ConsoleSession | None:
    return _sealer().open(request.cookies.get(SESSION_COOKIE))


def _page(request: Request, name: str, session: ConsoleSession | None, status: int = 200,
          **values: Any) -> HTMLResponse:
    csrf = _sealer().csrf_token(session.nonce) if session else None
    response = templates.TemplateResponse(
        request, name, {"session": session, "csrf": csrf, "prefix": PREFIX,
                        "poll_s": ConsoleState.settings.poll_s,
                        "done": request.query_params.get("done", "")[:200], **values},
        status_code=status)
    response.headers.update(SECURITY_HEADERS)
    return response


def _redirect(url: str) -> RedirectResponse:
    response = RedirectResponse(url, status_code=303)
    response.headers.update(SECURITY_HEADERS)
    return response


def _to_login(request: Request) -> Response:
    if request.headers.get("hx-request"):  # htmx follows this header, not a 303
        response = Response(status_code=401, headers={"hx-redirect": f"{PREFIX}/login"})
        response.headers.update(SECURITY_HEADERS)
        return response
    return _redirect(f"{PREFIX}/login")


def _refused(request: Request, session: ConsoleSession | None, message: str,
             status: int = 403) -> HTMLResponse:
    return _page(request, "error.html", session, status=status, message=message)


def _same_origin(request: Request) -> bool:
    """A browser sends Origin with every POST; it must be this host. Absent (non-browser
    clients): the CSRF token alone decides."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "")


async def _form(request: Request) -> dict[str, str]:
    data = await request.form()
    return {k: v for k, v in data.items() if isinstance(v, str)}


async def _checked_post(request: Request, role: str | None = "admin"
                        ) -> tuple[ConsoleSession | None, dict[str, str], Response | None]:
    """(session, form, None) for a signed-in POST with a valid CSRF token and a role that
    may make it; otherwise a response to return instead."""
    session = _session(request)
    if session is None:
        return None, {}, _to_login(request)
    form = await _form(request)
    token = form.get("csrf") or request.headers.get("x-csrf-token")
    if not _same_origin(request) or not _sealer().csrf_ok(session.nonce, token):
        return session, form, _refused(request, session, "Invalid or missing CSRF token.")
    if role == "admin" and session.role != "admin":
        return session, form, _refused(request, session, "This page needs the admin key.")
    return session, form, None


def _gate(request: Request, role: str = "admin") -> tuple[ConsoleSession | None,
                                                          Response | None]:
    session = _session(request)
    if session is None:
        return None, _to_login(request)
    if role == "admin" and session.role != "admin":
        return session, _refused(request, session, "This page needs the admin key; "
                                 "your key may use the approvals page.")
    return session, None


def _back(path: str, done: str, **params: str) -> RedirectResponse:
    query = urlencode({**{k: v for k, v in params.items() if v}, "done": done})
    return _redirect(f"{PREFIX}{path}?{query}")


async def _run(request: Request, session: ConsoleSession, name: str,
               build: Any) -> Response:
    """Render `name` from `build(api)` (a coroutine making the admin API calls); an API
    error becomes the page's message with the API's status; a key that stopped working
    ends the session."""
    async with AdminApi(request, session.api_key) as api:
        try:
            values = await build(api)
        except ApiError as error:
            if error.status == 401:
                response = _redirect(f"{PREFIX}/login")
                response.delete_cookie(SESSION_COOKIE, path=PREFIX)
                return response
            return _refused(request, session, error.message, status=error.status)
    if isinstance(values, Response):
        return values
    return _page(request, name, session, **values)


# ---------------------------------------------------------------- sign-in

@router.get("")
@router.get("/")
async def console_home(request: Request) -> Response:
    session = _session(request)
    if session is None:
        return _to_login(request)
    return _redirect(f"{PREFIX}/overview" if session.role == "admin" else f"{PREFIX}/approvals")


@router.get("/login")
async def console_login_page(request: Request) -> Response:
    nonce = new_login_nonce()
    response = _page(request, "login.html", None, login_csrf=_sealer().csrf_token(nonce))
    response.set_cookie(LOGIN_COOKIE, nonce, max_age=3600, path=PREFIX, httponly=True,
                        samesite="strict", secure=ConsoleState.settings.secure_cookie)
    return response


@router.post("/login")
async def console_login(request: Request) -> Response:
    """Admin key: every page. A key with can_confirm: the approvals page only. The key
    is tried against the admin API; nothing else is trusted."""
    sealer = _sealer()
    form = await _form(request)
    if not _same_origin(request) or not sealer.csrf_ok(request.cookies.get(LOGIN_COOKIE),
                                                       form.get("csrf")):
        return _refused(request, None, "Invalid or missing CSRF token; reload the page.")
    api_key = (form.get("api_key") or "").strip()
    role = None
    if api_key and len(api_key) <= 512:
        async with AdminApi(request, api_key) as api:
            for path, candidate in (("/admin/v1/tenants", "admin"),
                                    ("/v1/agent/confirmations", "approver")):
                try:
                    await api.get(path, limit=1) if candidate == "approver" else await api.get(path)
                except ApiError as error:
                    if error.status in (503, 504):
                        return _refused(request, None, "The gateway cannot check keys right "
                                        "now; retry shortly.", status=503)
                    continue
                role = candidate
                break
    if role is None:
        nonce = new_login_nonce()
        response = _page(request, "login.html", None, status=401,
                         login_csrf=sealer.csrf_token(nonce),
                         error="That key is not the admin key or a key allowed to confirm.")
        response.set_cookie(LOGIN_COOKIE, nonce, max_age=3600, path=PREFIX, httponly=True,
                            samesite="strict", secure=ConsoleState.settings.secure_cookie)
        return response
    # The edge's per-address gate gives back the slot of a sign-in that succeeded.
    context_of(request).extra["admin"] = role == "admin"
    context_of(request).key_id = "console" if role != "admin" else None
    cookie, _ = sealer.seal(api_key, role)  # type: ignore[arg-type]
    response = _redirect(f"{PREFIX}/overview" if role == "admin" else f"{PREFIX}/approvals")
    response.set_cookie(SESSION_COOKIE, cookie, max_age=ConsoleState.settings.session_ttl_s,
                        path=PREFIX, httponly=True, samesite="strict",
                        secure=ConsoleState.settings.secure_cookie)
    response.delete_cookie(LOGIN_COOKIE, path=PREFIX)
    return response


@router.post("/logout")
async def console_logout(request: Request) -> Response:
    session, _, refused = await _checked_post(request, role=None)
    if refused is not None and session is not None:
        return refused
    response = _redirect(f"{PREFIX}/login")
    response.delete_cookie(SESSION_COOKIE, path=PREFIX)
    return response


# ---------------------------------------------------------------- overview

@router.get("/overview")
async def console_overview(request: Request, range: str = "24h",
                           group_by: str = "tenant") -> Response:
    session, refused = _gate(request)
    if refused is not None:
        return refused
    range = range if range in RANGES_S else "24h"
    group_by = group_by if group_by in GROUPS else "tenant"
    end = int(time.time()) + 1
    start = end - RANGES_S[range]
    interval = INTERVALS_S[range]

    async def build(api: AdminApi) -> dict[str, Any]:
        series = await api.get("/admin/v1/usage", group_by=group_by, start=start, end=end,
                               interval_s=interval)
        by_group = await api.get("/admin/v1/usage", group_by=group_by, start=start, end=end)
        tiers = await api.get("/admin/v1/usage", group_by="tier", start=start, end=end)
        chart = charts.time_series(series["data"], group_by, start, end, interval)
        chart["tiers"] = {row.get("tier") or "(none)": row["requests"]
                          for row in tiers["data"]}
        rows = charts.totals(by_group["data"], group_by)
        return {"range": range, "ranges": list(RANGES_S), "group_by": group_by,
                "groups": GROUPS, "rows": rows, "chart_json": json.dumps(chart),
                "recent": (await api.get("/admin/v1/usage/requests", start=start,
                                         limit=20))["data"]}
    return await _run(request, session, "overview.html", build)


# ---------------------------------------------------------------- keys

@router.get("/keys")
async def console_keys(request: Request, tenant: str = "") -> Response:
    session, refused = _gate(request)
    if refused is not None:
        return refused

    async def build(api: AdminApi) -> dict[str, Any]:
        keys = (await api.get("/admin/v1/keys", tenant_id=tenant or None))["data"]
        tenants = (await api.get("/admin/v1/tenants"))["data"]
        return {"keys": keys, "tenants": tenants, "tenant": tenant}
    return await _run(request, session, "keys.html", build)


@router.post("/keys")
async def console_create_key(request: Request) -> Response:
    session, form, refused = await _checked_post(request)
    if refused is not None:
        return refused

    async def build(api: AdminApi) -> dict[str, Any]:
        fields = forms.key_fields(form, editing=False)
        created = await api.call("POST", "/admin/v1/keys",
                                 body={"tenant_id": form.get("tenant_id", "").strip(),
                                       **fields})
        # The secret is shown on this response only: never in a URL, never again.
        return {"secret": created.pop("key"), "key": created, "action": "created"}
    return await _run(request, session, "key_secret.html", build)


@router.post("/keys/{key_id}/limits")
async def console_edit_key(request: Request, key_id: str) -> Response:
    session, form, refused = await _checked_post(request)
    if refused is not None:
        return refused

    async def build(api: AdminApi) -> Response:
        await api.call("PATCH", f"/admin/v1/keys/{key_id}",
                       body=forms.key_fields(form, editing=True))
        return _back("/keys", f"updated {key_id}")
    return await _run(request, session, "keys.html", build)


@router.post("/keys/{key_id}/{action}")
async def console_key_action(request: Request, key_id: str, action: str) -> Response:
    session, form, refused = await _checked_post(request)
    if refused is not None:
        return refused
    if action not in ("disable", "enable", "rotate"):
        return _refused(request, session, "Unknown action.", status=404)

    async def build(api: AdminApi) -> Any:
        result = await api.call("POST", f"/admin/v1/keys/{key_id}/{action}",
                                body={} if action == "rotate" else None)
        if action == "rotate":
            return {"secret": result.pop("key", None), "key": result, "action": "rotated"}
        return _back("/keys", f"{action}d {key_id}")
    return await _run(request, session, "key_secret.html", build)


# ---------------------------------------------------------------- cache

@router.get("/cache")
async def console_cache(request: Request, tenant: str = "", namespace: str = "") -> Response:
    session, refused = _gate(request)
    if refused is not None:
        return refused

    async def build(api: AdminApi) -> dict[str, Any]:
        spaces = (await api.get("/admin/v1/cache/namespaces", tenant=tenant or None))["data"]
        entries = (await api.get("/admin/v1/cache/entries", tenant=tenant or None,
                                 namespace=namespace or None, limit=100))["data"]
        stats = await api.get("/admin/v1/cache/stats")
        return {"namespaces": spaces, "entries": entries, "stats": stats, "tenant": tenant,
                "namespace": namespace,
                "chart_json": json.dumps({f"{n['tenant']}/{n['namespace']}": n["similarity"]
                                          for n in spaces if n.get("similarity")})}
    return await _run(request, session, "cache.html", build)


@router.post("/cache/invalidate")
async def console_cache_invalidate(request: Request) -> Response:
    session, form, refused = await _checked_post(request)
    if refused is not None:
        return refused

    async def build(api: AdminApi) -> Response:
        body = {"kind": form.get("kind", ""), "value": form.get("value") or None,
                "tenant": form.get("tenant") or None}
        result = await api.call("POST", "/admin/v1/cache/invalidate", body=body)
        return _back("/cache", f"invalidated {result.get('deleted', 0)} entries")
    return await _run(request, session, "cache.html", build)


@router.post("/cache/entries/{entry_id}/wrong")
async def console_cache_wrong(request: Request, entry_id: str) -> Response:
    session, form, refused = await _checked_post(request)
    if refused is not None:
        return refused

    async def build(api: AdminApi) -> Response:
        await api.call("POST", "/v1/cache/feedback",
                       body={"entry_id": entry_id, "reason": form.get("reason") or
                             "marked wrong in the console"})
        return _back("/cache", f"marked {entry_id} wrong: removed, recorded as a negative")
    return await _run(request, session, "cache.html", build)


# ---------------------------------------------------------------- documents

@router.get("/documents")
async def console_documents(request: Request, tenant: str = "",
                            collection: str = "") -> Response:
    session, refused = _gate(request)
    if refused is not None:
        return refused

    async def build(api: AdminApi) -> dict[str, Any]:
        tenants = (await api.get("/admin/v1/tenants"))["data"]
        chosen = tenant or (tenants[0]["tenant_id"] if tenants else "")
        collections = ((await api.get("/v1/collections", tenant=chosen))["data"]
                       if chosen else [])
        documents = ((await api.get(f"/v1/collections/{collection}/documents",
                                    tenant=chosen, limit=500))["data"]
                     if chosen and collection else [])
        return {"tenants": tenants, "tenant": chosen, "collections": collections,
                "collection": collection, "documents": documents}
    return await _run(request, session, "documents.html", build)


@router.post("/documents/delete")
async def console_delete_document(request: Request) -> Response:
    session, form, refused = await _checked_post(request)
    if refused is not None:
        return refused
    tenant, collection = form.get("tenant", ""), form.get("collection", "")
    doc_id = form.get("doc_id", "")

    async def build(api: AdminApi) -> Response:
        path = f"/v1/collections/{collection}" + (f"/documents/{doc_id}" if doc_id else "")
        await api.call("DELETE", path, params={"tenant": tenant})
        return _back("/documents", f"deleted {doc_id or collection}", tenant=tenant,
                     collection=collection if doc_id else "")
    return await _run(request, session, "documents.html", build)


# ---------------------------------------------------------------- agents

@router.get("/agents")
async def console_agents(request: Request, tenant: str = "", status: str = "") -> Response:
    session, refused = _gate(request)
    if refused is not None:
        return refused

    async def build(api: AdminApi) -> dict[str, Any]:
        sessions = (await api.get("/admin/v1/agent/sessions", tenant=tenant or None,
                                  status=status or None))["data"]
        return {"sessions": sessions, "tenant": tenant, "status_filter": status}
    return await _run(request, session, "agents.html", build)


@router.get("/agents/{session_id}")
async def console_agent_session(request: Request, session_id: str) -> Response:
    session, refused = _gate(request, role="approver")
    if refused is not None:
        return refused

    async def build(api: AdminApi) -> dict[str, Any]:
        view = await api.get(f"/v1/agent/sessions/{session_id}")
        audit = await api.get(f"/v1/agent/sessions/{session_id}/audit")
        chain = (await api.get("/admin/v1/agent/audit/verify")
                 if session.role == "admin" else None)
        return {"agent": view, "audit": audit, "chain": chain}
    return await _run(request, session, "agent_session.html", build)


@router.get("/approvals")
async def console_approvals(request: Request) -> Response:
    session, refused = _gate(request, role="approver")
    if refused is not None:
        return refused
    return _page(request, "approvals.html", session)


@router.get("/approvals/pending")
async def console_pending(request: Request) -> Response:
    """The live list (htmx polls it every console.poll_s)."""
    session, refused = _gate(request, role="approver")
    if refused is not None:
        return refused

    async def build(api: AdminApi) -> dict[str, Any]:
        pending = (await api.get("/v1/agent/confirmations"))["data"]
        for item in pending:
            item["arguments_json"] = json.dumps(
                item["pending_confirmation"]["arguments"], indent=2, ensure_ascii=False)
        return {"pending": pending}
    return await _run(request, session, "_pending.html", build)


@router.post("/approvals/{session_id}/{call_id}")
async def console_decide(request: Request, session_id: str, call_id: str) -> Response:
    """Approve (the call runs once and the session resumes) or deny."""
    session, form, refused = await _checked_post(request, role=None)
    if refused is not None:
        return refused
    decision = form.get("decision")
    if decision not in ("approve", "deny"):
        return _refused(request, session, "decision must be approve or deny", status=422)

    async def build(api: AdminApi) -> Response:
        result = await api.call(
            "POST", f"/v1/agent/sessions/{session_id}/confirmations/{call_id}",
            body={"approve": decision == "approve"})
        verb = "approved" if decision == "approve" else "denied"
        return _back(f"/agents/{session_id}",
                     f"{verb} {call_id}; session is {result.get('status')}")
    return await _run(request, session, "approvals.html", build)
