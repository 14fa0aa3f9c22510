"""What every route gets through FastAPI's Depends: the Gateway of this replica and the
caller. `resolve_caller` is the one authentication step of every route except chat and
embeddings, whose admission authenticates in the same Quota call that reserves."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

from deployments.http_edge import context_of
from serve_app.accounts.keys import bearer_token
from serve_app.errors import ApiError

if TYPE_CHECKING:
    from deployments.gateway.core import Gateway


def api_key_of(request: Request) -> str | None:
    return bearer_token(request.headers.get("authorization"), request.headers.get("x-api-key"))


_gateway: "Gateway | None" = None


def bind_gateway(gateway: "Gateway") -> None:
    """Called by the Gateway's constructor: one Gateway per replica process. (Not
    `app.state`: Serve pickles the ingress app with the class, so the app a replica serves
    is a copy of the module's.)"""
    global _gateway
    _gateway = gateway


def gateway_of() -> "Gateway":
    """The replica's Gateway."""
    if _gateway is None:
        raise ApiError(503, "The gateway is starting; retry shortly.", code="not_ready")
    return _gateway


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: a tenant's key, the admin key (tenant_id None), or
    anonymous when keys are not required."""

    tenant_id: str | None
    key_id: str
    can_confirm: bool = False
    can_self_confirm: bool = False
    admin: bool = False

    def principal(self) -> dict[str, Any]:
        """What a service behind a handle needs of the caller, and nothing the client sent."""
        return {"tenant_id": self.tenant_id, "key_id": self.key_id,
                "can_confirm": self.can_confirm, "can_self_confirm": self.can_self_confirm,
                "admin": self.admin}


async def resolve_caller(request: Request,
                         gateway: Annotated[Any, Depends(gateway_of)]) -> Caller:
    """One Quota call: admin, a tenant key, or anonymous; a bad key is 401. Also names the
    caller in the request's log line."""
    token = api_key_of(request)
    accounting = gateway.settings.quota.enabled
    if not token and not accounting:
        return Caller(tenant_id="anonymous", key_id="anonymous")
    found = await gateway.quota.caller(token, accounting)
    caller = Caller(tenant_id=found["tenant_id"], key_id=found["key_id"],
                    can_confirm=bool(found.get("can_confirm")),
                    can_self_confirm=bool(found.get("can_self_confirm")),
                    admin=bool(found.get("admin")))
    context = context_of(request)
    if caller.admin:
        context.extra["admin"] = True
    else:
        context.tenant, context.key_id = caller.tenant_id or "", caller.key_id
    return caller


async def require_admin(request: Request, caller: Annotated[Caller, Depends(resolve_caller)],
                        ) -> Caller:
    if not api_key_of(request):
        raise ApiError(401, "The admin API needs 'Authorization: Bearer <admin key>'.",
                       code="missing_api_key")
    if not caller.admin:
        raise ApiError(403, "This key is not the admin key.", code="not_admin")
    return caller


def tenant_scope(caller: Caller, tenant: str | None) -> str:
    """The tenant a call works on: a key's own, or the one the admin key names."""
    if tenant is not None:
        if not caller.admin:
            raise ApiError(403, "Only the admin key may name a tenant.", code="not_admin",
                           param="tenant")
        return tenant
    if caller.admin:
        raise ApiError(400, "The admin key must name the tenant (?tenant=).",
                       code="tenant_required", param="tenant")
    return caller.tenant_id or ""


# Typed Any for FastAPI: the Gateway class imports the routers that use this.
GatewayDep = Annotated[Any, Depends(gateway_of)]
CallerDep = Annotated[Caller, Depends(resolve_caller)]
AdminDep = Annotated[Caller, Depends(require_admin)]
