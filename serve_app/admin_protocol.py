"""Wire models of the admin API (pydantic, no logic)."""
from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _epoch(value: Any) -> float | None:
    if value is None or isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.timestamp()
    raise ValueError("expires_at must be epoch seconds or an ISO 8601 date-time")


class KeyFields(_Strict):
    name: str | None = Field(None, max_length=200)
    allowed_models: list[str] | None = Field(None, description="Omit or null: every model.")
    rpm: int | None = Field(None, ge=1, description="Requests per minute; null: unlimited.")
    tpm: int | None = Field(None, ge=1, description="Tokens per minute; null: unlimited.")
    budget_usd: float | None = Field(None, ge=0, description="USD per period; null: none.")
    budget_period: Literal["day", "month"] | None = None
    expires_at: float | str | None = Field(None, description="Epoch seconds or ISO 8601.")
    can_confirm: bool | None = Field(None, description="May approve agent tool calls.")
    alert_webhook_url: str | None = None
    cache_sampled: bool | None = Field(
        None, description="Cache answers sampled with temperature > 0 for this key.")
    route_overrides: dict[str, Any] | None = Field(
        None, description="Per-key router policy overrides, e.g. thresholds.")

    @field_validator("expires_at")
    @classmethod
    def _to_epoch(cls, value: Any) -> float | None:
        return _epoch(value)


class KeyCreate(KeyFields):
    tenant_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")


class KeyUpdate(KeyFields):
    disabled: bool | None = None


class KeyRotate(_Strict):
    grace_s: float = Field(0.0, ge=0, le=30 * 86400,
                           description="How long the old secret keeps working.")
