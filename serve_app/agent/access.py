"""Who may do what with an agent session (pure: no I/O).

A session belongs to the key that created it (and lives in that key's tenant). Other keys
of the tenant get nothing until the creator grants them "read" (view, audit) or "drive"
(post messages: their own LLM steps, admitted and billed under their own key). Keys with
can_confirm may read their tenant's sessions (to review what they approve) and confirm
calls, but never a call they asked for themselves unless their policy allows it
(can_self_confirm, or agent.allow_self_confirmation). The admin key acts across tenants.
Another tenant's session is invisible (404); a session of your tenant you hold no right
on is 403.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from serve_app.agent.sessions import Session
from serve_app.errors import ApiError

Right = Literal["read", "drive", "manage"]
GRANTS = ("read", "drive")


@dataclass(frozen=True)
class Principal:
    key_id: str
    tenant_id: str | None
    can_confirm: bool = False
    can_self_confirm: bool = False
    admin: bool = False

    @classmethod
    def from_wire(cls, data: dict[str, Any] | None) -> "Principal | None":
        """The gateway's caller dict (tenant_id, key_id, can_confirm, ...)."""
        if not data:
            return None
        if not isinstance(data, dict) or not data.get("key_id"):
            raise ApiError(400, "invalid principal", code="invalid_principal")
        return cls(key_id=str(data["key_id"]), tenant_id=data.get("tenant_id"),
                   can_confirm=bool(data.get("can_confirm")),
                   can_self_confirm=bool(data.get("can_self_confirm")),
                   admin=bool(data.get("admin")))


def creator_of(session: Session) -> str | None:
    """The creating key; sessions made before keys were recorded fall back to the key
    the gateway stamped on them (metadata.billing_key_id, never client-controlled)."""
    return session.creator_key or session.metadata.get("billing_key_id")


def require(session: Session, principal: Principal | None, right: Right) -> None:
    """Raise 404/403 unless principal holds `right` on session. None: an internal caller
    already scoped by tenant (tests, tools)."""
    if principal is None or principal.admin:
        return
    if session.owner is not None and principal.tenant_id != session.owner:
        raise not_found(session.id)
    creator = creator_of(session)
    if creator is None or principal.key_id == creator:
        return
    granted = session.grants.get(principal.key_id)
    if right == "read" and (granted in GRANTS or principal.can_confirm):
        return
    if right == "drive" and granted == "drive":
        return
    raise ApiError(403, f"this key may not {_VERBS[right]} agent session {session.id}; "
                   "its creator can grant access", code="session_access_denied")


def may_confirm(session: Session, principal: Principal, requested_by: str | None, *,
                allow_self: bool) -> None:
    """A confirmer must be allowed to confirm, in the session's tenant, and not the key
    that asked for the call (unless a policy allows exactly that)."""
    if not principal.admin and session.owner is not None \
            and principal.tenant_id != session.owner:
        raise not_found(session.id)
    if not principal.can_confirm:
        raise ApiError(403, "This API key may not confirm agent actions.",
                       code="confirmation_not_allowed")
    if requested_by is not None and principal.key_id == requested_by \
            and not (allow_self or principal.can_self_confirm):
        raise ApiError(403, "A key may not confirm a call it asked for itself; another "
                       "key with can_confirm must approve it.",
                       code="self_confirmation_not_allowed")


def not_found(session_id: str) -> ApiError:
    return ApiError(404, f"no agent session {session_id!r}", code="session_not_found",
                    param="session_id")


_VERBS = {"read": "read", "drive": "post messages to", "manage": "manage"}
