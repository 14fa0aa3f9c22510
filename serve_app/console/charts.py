"""Usage rows of the admin API -> the series the overview's charts draw (pure)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

SERIES_METRICS = ("requests", "tokens", "cost_usd", "saved_usd")
MAX_GROUPS = 8  # more series than this are summed into "other"
OTHER = "other"


def time_series(rows: Iterable[Mapping[str, Any]], group_by: str, start: int, end: int,
                interval_s: int) -> dict[str, Any]:
    """{"labels": [bucket starts], "metrics": {metric: {group: [values per bucket]}},
    "rates": {"errors": [...], "fallbacks": [...]}} with every bucket of [start, end)
    present (zero where nothing happened) and the largest MAX_GROUPS groups by requests."""
    first = start // interval_s * interval_s
    buckets = list(range(first, end, interval_s)) or [first]
    index = {b: i for i, b in enumerate(buckets)}
    rows = [r for r in rows if r.get("bucket") in index]
    totals: dict[str, int] = {}
    for row in rows:
        name = _group_name(row.get(group_by))
        totals[name] = totals.get(name, 0) + int(row.get("requests") or 0)
    shown = sorted(totals, key=lambda g: (-totals[g], g))[:MAX_GROUPS]
    metrics: dict[str, dict[str, list[float]]] = {m: {} for m in SERIES_METRICS}
    requests = [0] * len(buckets)
    errors = [0] * len(buckets)
    fallbacks = [0] * len(buckets)
    for row in rows:
        i = index[row["bucket"]]
        name = _group_name(row.get(group_by))
        name = name if name in shown else OTHER
        values = {"requests": row.get("requests") or 0,
                  "tokens": (row.get("tokens_in") or 0) + (row.get("tokens_out") or 0),
                  "cost_usd": row.get("cost_usd") or 0.0,
                  "saved_usd": row.get("saved_usd") or 0.0}
        for metric, value in values.items():
            series = metrics[metric].setdefault(name, [0] * len(buckets))
            series[i] += value
        requests[i] += row.get("requests") or 0
        errors[i] += row.get("errors") or 0
        fallbacks[i] += row.get("fallbacks") or 0
    return {"labels": buckets, "metrics": metrics, "rates": {
        "errors": [_rate(e, n) for e, n in zip(errors, requests)],
        "fallbacks": [_rate(f, n) for f, n in zip(fallbacks, requests)]}}


def totals(rows: Iterable[Mapping[str, Any]], group_by: str) -> list[dict[str, Any]]:
    """One row per group (the admin API's summary without buckets), biggest spend first."""
    out = []
    for row in rows:
        out.append({"group": _group_name(row.get(group_by)),
                    "requests": row.get("requests") or 0, "errors": row.get("errors") or 0,
                    "tokens": (row.get("tokens_in") or 0) + (row.get("tokens_out") or 0),
                    "cost_usd": row.get("cost_usd") or 0.0,
                    "saved_usd": row.get("saved_usd") or 0.0,
                    "cache_hits": row.get("cache_hits") or 0,
                    "fallbacks": row.get("fallbacks") or 0})
    return sorted(out, key=lambda r: (-r["cost_usd"], -r["requests"], r["group"]))


def _group_name(value: Any) -> str:
    return "(none)" if value in (None, "") else str(value)


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None
