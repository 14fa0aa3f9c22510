"""Wire models of the admin API (pydantic, no logic)."""
from __future__ import annotations

import datetime as dt
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    # No NaN or Infinity (Python's JSON parser accepts them): a NaN budget would compare
    # false with everything and never be exceeded. Strict: "12" is not a number of
    # requests and "yes" not a boolean.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


# Bounds that keep every value storable (SQLite integers are 64-bit) and meaningful.
MAX_RPM = 10**9
MAX_TPM = 10**12
MAX_BUDGET_USD = 10**9
MAX_EPOCH = 32_503_680_000.0  # year 3000
NOT_NULL = ("name", "budget_period", "can_confirm", "can_self_confirm", "cache_sampled",
            "disabled", "route_overrides")


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
    allowed_models: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None, max_length=100, description="Models that may answer (local name, provider "
        "model ids or names) and router aliases the key may ask for; omit or null: every "
        "model.")
    rpm: int | None = Field(None, ge=1, le=MAX_RPM,
                            description="Requests per minute; null: unlimited.")
    tpm: int | None = Field(None, ge=1, le=MAX_TPM,
                            description="Tokens per minute; null: unlimited.")
    budget_usd: float | None = Field(None, ge=0, le=MAX_BUDGET_USD,
                                     description="USD per period; null: none.")
    budget_period: Literal["day", "month"] | None = None
    expires_at: float | str | None = Field(None, description="Epoch seconds or ISO 8601.")
    can_confirm: bool | None = Field(None, description="May approve agent tool calls.")
    can_self_confirm: bool | None = Field(
        None, description="May approve tool calls its own agent runs asked for (default: "
        "only another key with can_confirm may).")
    alert_webhook_url: str | None = Field(None, max_length=2000,
                                          pattern=r"^https?://[^\s]+$")
    cache_sampled: bool | None = Field(
        None, description="Cache answers sampled with temperature > 0 for this key.")
    route_overrides: dict[str, Any] | None = Field(
        None, description="Per-key router policy overrides, e.g. thresholds.")

    @field_validator("expires_at")
    @classmethod
    def _to_epoch(cls, value: Any) -> float | None:
        epoch = _epoch(value)
        if epoch is not None and not (0 <= epoch <= MAX_EPOCH):
            raise ValueError("expires_at must be between 1970 and 3000")
        return epoch

    @field_validator("route_overrides")
    @classmethod
    def _small_overrides(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(json.dumps(value)) > 10_000:
            raise ValueError("route_overrides must be at most 10,000 bytes of JSON")
        return value

    @model_validator(mode="after")
    def _no_null_for_flags(self) -> "KeyFields":
        """Only limits can be cleared with null; flags and names always have a value."""
        for name in NOT_NULL:
            if name in self.model_fields_set and getattr(self, name, None) is None:
                raise ValueError(f"{name} cannot be null")
        return self


class KeyCreate(KeyFields):
    tenant_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")


class KeyUpdate(KeyFields):
    disabled: bool | None = None


class KeyRotate(_Strict):
    grace_s: float = Field(0.0, ge=0, le=30 * 86400,
                           description="How long the old secret keeps working.")
