"""HTML form fields -> the admin API's typed JSON (pure). Forms send strings; the admin
API is strict ("12" is not a number), so the console converts here and the API still
validates everything."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from serve_app.errors import ApiError

INT_FIELDS = ("rpm", "tpm")
FLOAT_FIELDS = ("budget_usd",)
FLAG_FIELDS = ("can_confirm", "can_self_confirm", "cache_sampled")
TEXT_FIELDS = ("name", "budget_period")


def _number(name: str, text: str, kind: type) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise ApiError(422, f"'{name}' must be a number.", code="invalid_value",
                       param=name) from None
    if kind is float and value != value:  # NaN
        raise ApiError(422, f"'{name}' must be a number.", code="invalid_value", param=name)
    return value


def key_fields(form: Mapping[str, str], *, editing: bool) -> dict[str, Any]:
    """Creating: empty fields are left out. Editing: an empty limit field clears the
    limit (null), flags come from checkboxes (absent = off)."""
    fields: dict[str, Any] = {}
    for name, kind in [*((n, int) for n in INT_FIELDS), *((n, float) for n in FLOAT_FIELDS)]:
        text = (form.get(name) or "").strip()
        if text:
            fields[name] = _number(name, text, kind)
        elif editing:
            fields[name] = None
    for name in TEXT_FIELDS:
        text = (form.get(name) or "").strip()
        if text:
            fields[name] = text
    models = (form.get("allowed_models") or "").strip()
    if models:
        fields["allowed_models"] = [m.strip() for m in models.split(",") if m.strip()]
    elif editing:
        fields["allowed_models"] = None
    for name in FLAG_FIELDS:
        if editing or form.get(name):
            fields[name] = form.get(name) in ("on", "true", "1")
    return fields
