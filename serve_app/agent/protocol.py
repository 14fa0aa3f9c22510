"""Request bodies of the agent API (pydantic wire models, no logic).

    POST /v1/agent/sessions                              CreateSessionRequest
    POST /v1/agent/sessions/{id}/messages                PostMessageRequest
    POST /v1/agent/sessions/{id}/confirmations/{call_id} ConfirmRequest
    POST /v1/agent/sessions/{id}/grants                  GrantRequest
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.errors import ApiError, param_from_location


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateSessionRequest(_Body):
    system_prompt: str | None = Field(None, description="Replaces the default agent prompt.")
    goal: str | None = Field(None, description="Appended to the system prompt.")
    tools: list[str] | None = Field(None, description="Tool names (files.read or files_read); "
                                    "default: the server's default tools.")
    budgets: dict[str, Any] | None = Field(None, description="Any of wall_clock_s, "
                                           "max_llm_calls, max_tool_calls, max_tokens, "
                                           "max_usd; capped by the server's maximum.")
    model: str | None = Field(None, min_length=1, description="Default: the server's agent "
                              "model ('auto' = routed).")
    metadata: dict[str, Any] | None = None


class PostMessageRequest(_Body):
    content: str = Field(min_length=1)


class ConfirmRequest(_Body):
    approve: bool


class GrantRequest(_Body):
    key_id: str = Field(min_length=1, max_length=128, description="A key of the same "
                        "tenant.")
    right: Literal["read", "drive"] | None = Field(
        "drive", description="read: view and audit; drive: also post messages (its steps "
        "are admitted and billed under that key). null: take every right away.")


def parse(model: type[_Body], body: Any) -> _Body:
    """Validate a body; errors become a 422 ApiError naming the field."""
    try:
        return model.model_validate(body if body is not None else {})
    except ValidationError as exc:
        error = exc.errors()[0]
        raise ApiError(422, f"{error['msg']}", param=param_from_location(error["loc"]),
                       code="invalid_request") from exc
