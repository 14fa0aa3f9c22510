"""Generate the stack's Grafana dashboard: dashboards/grafana/llmstack.json.

    python -m dashboards.build_grafana           # write it
    python -m dashboards.build_grafana --check   # exit 1 if the committed file differs

Every panel charts metrics of deployments/metrics.py, as Ray exports them to Prometheus
(a `ray_` prefix; Serve adds `application`, `deployment` and `replica` labels). The
dashboard has a `datasource` variable (a Prometheus data source, as Ray's own dashboards)
and an `application` variable (the Serve application: `stack` under `make run`), and links
to Ray's Serve dashboards (uids rayServeDashboard and rayServeDeploymentDashboard), so it
sits beside them in the same Grafana. Edit the panels here, regenerate, commit both;
tests/unit/test_dashboard.py checks that they agree.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parent / "grafana" / "llmstack.json"
UID = "llmstack"
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Every series of the stack's application(s): the `application` variable.
APP = 'application=~"$application"'
RATE = "$__rate_interval"


def m(name: str) -> str:
    """A metric of deployments/metrics.py as Prometheus sees it."""
    return f"ray_{name}"


@dataclass
class Target:
    expr: str
    legend: str = ""
    format: str = "time_series"


@dataclass
class Panel:
    title: str
    description: str
    targets: list[Target]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    height: int = 8
    options: dict = field(default_factory=dict)
    field_defaults: dict = field(default_factory=dict)


@dataclass
class Row:
    title: str


def quantiles(metric: str, by: str, legend: str, extra: str = "") -> list[Target]:
    selector = ",".join(filter(None, [APP, extra]))
    return [Target(f"histogram_quantile({q}, sum by (le, {by}) "
                   f"(rate({m(metric)}_bucket{{{selector}}}[{RATE}])))",
                   f"p{int(q * 100)} {legend}")
            for q in (0.5, 0.95)]


BREAKER_MAPPINGS = [{"type": "value", "options": {
    "0": {"text": "closed", "color": "green", "index": 0},
    "1": {"text": "half-open", "color": "yellow", "index": 1},
    "2": {"text": "open", "color": "red", "index": 2}}}]

LAYOUT: list[Panel | Row] = [
    Row("Traffic"),
    Panel("Requests by route and status",
          "HTTP requests per second the Gateway answered, by route and status code "
          "(llmstack_requests_total).",
          [Target(f"sum by (route, status) (rate({m('llmstack_requests_total')}{{{APP}}}"
                  f"[{RATE}]))", "{{route}} {{status}}")],
          unit="reqps", width=8),
    Panel("Error ratio",
          "Share of requests answered with a non-2xx status (4xx: the client or a limit; "
          "5xx: the stack or every model of a chain).",
          [Target(f"sum(rate({m('llmstack_requests_total')}{{{APP},status!~\"2..\"}}"
                  f"[{RATE}])) / sum(rate({m('llmstack_requests_total')}{{{APP}}}[{RATE}]))",
                  "errors")],
          unit="percentunit", width=8),
    Panel("Tokens by model",
          "Tokens per second in prompts (input) and answers (output), by the model that "
          "answered (llmstack_tokens_total; OpenTelemetry GenAI gen_ai.request.model, "
          "gen_ai.token.type).",
          [Target(f"sum by (gen_ai_request_model, gen_ai_token_type) "
                  f"(rate({m('llmstack_tokens_total')}{{{APP}}}[{RATE}]))",
                  "{{gen_ai_request_model}} {{gen_ai_token_type}}")],
          unit="short", width=8),
    Row("Latency"),
    Panel("Request latency",
          "End-to-end latency per route, p50 and p95 (llmstack_request_latency_seconds).",
          quantiles("llmstack_request_latency_seconds", "route", "{{route}}"),
          unit="s", width=8),
    Panel("Latency by pipeline stage",
          "p95 time in each stage of the chat pipeline: admit (key and quota), cache_exact "
          "and cache_lookup, embed, retrieve (RAG), route (classifier), generate "
          "(non-streamed upstream call), first_output (a stream's first output), stream, "
          "record (usage row) (llmstack_stage_latency_seconds).",
          [Target(f"histogram_quantile(0.95, sum by (le, stage) "
                  f"(rate({m('llmstack_stage_latency_seconds')}_bucket{{{APP}}}[{RATE}])))",
                  "p95 {{stage}}")],
          unit="s", width=8),
    Panel("Time to first token",
          "Streamed requests: time until the first content chunk, by model, p50 and p95 "
          "(llmstack_time_to_first_token_seconds).",
          quantiles("llmstack_time_to_first_token_seconds", "gen_ai_request_model",
                    "{{gen_ai_request_model}}"),
          unit="s", width=8),
    Row("Cost and quota"),
    Panel("Spend and cache savings",
          "USD per hour spent, by tenant and the model that answered "
          "(llmstack_cost_usd_total), and the spend that cache hits avoided "
          "(llmstack_cache_saved_usd_total).",
          [Target(f"sum by (tenant, model) (rate({m('llmstack_cost_usd_total')}{{{APP}}}"
                  f"[{RATE}])) * 3600", "spent {{tenant}} {{model}}"),
           Target(f"sum by (gen_ai_request_model) "
                  f"(rate({m('llmstack_cache_saved_usd_total')}{{{APP}}}[{RATE}])) * 3600",
                  "saved {{gen_ai_request_model}}")],
          unit="currencyUSD", width=8),
    Panel("Quota rejections",
          "Requests refused by a key's limit, per second: rpm, tpm or budget "
          "(llmstack_rate_limited_total).",
          [Target(f"sum by (tenant, limit) (rate({m('llmstack_rate_limited_total')}"
                  f"{{{APP}}}[{RATE}]))", "{{tenant}} {{limit}}")],
          unit="reqps", width=8),
    Panel("Budget remaining",
          "USD left in the current budget period, per key with a budget "
          "(llmstack_budget_remaining_usd; updated when the key's requests settle).",
          [Target(f"min by (tenant, key_id) ({m('llmstack_budget_remaining_usd')}{{{APP}}})",
                  "{{tenant}} {{key_id}}")],
          unit="currencyUSD", kind="bargauge", width=8,
          options={"displayMode": "gradient", "orientation": "horizontal",
                   "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}),
    Row("Semantic cache"),
    Panel("Cache hits and misses",
          "Cache answers per second: hits by match kind (exact, semantic) and misses by "
          "reason (llmstack_cache_hits_total, llmstack_cache_misses_total).",
          [Target(f"sum by (match) (rate({m('llmstack_cache_hits_total')}{{{APP}}}"
                  f"[{RATE}]))", "hit {{match}}"),
           Target(f"sum by (reason) (rate({m('llmstack_cache_misses_total')}{{{APP}}}"
                  f"[{RATE}]))", "miss {{reason}}")],
          unit="reqps", width=8),
    Panel("Cache hit ratio",
          "Hits over lookups (hits + misses).",
          [Target(f"sum(rate({m('llmstack_cache_hits_total')}{{{APP}}}[{RATE}])) / "
                  f"(sum(rate({m('llmstack_cache_hits_total')}{{{APP}}}[{RATE}])) + "
                  f"sum(rate({m('llmstack_cache_misses_total')}{{{APP}}}[{RATE}])))",
                  "hit ratio")],
          unit="percentunit", width=8),
    Panel("Cache hit similarity",
          "Cosine similarity of the served hits (llmstack_cache_hit_similarity): how close "
          "to the threshold the cache answers.",
          [Target(f"sum by (le) (increase({m('llmstack_cache_hit_similarity')}_bucket"
                  f"{{{APP}}}[{RATE}]))", "{{le}}", format="heatmap")],
          kind="heatmap", width=8,
          options={"calculate": False, "yAxis": {"unit": "short"},
                   "cellGap": 1, "color": {"mode": "scheme", "scheme": "Oranges"}}),
    Row("Routing"),
    Panel("Route tiers",
          "Prompts the complexity classifier sent to each tier, per second, by tenant "
          "(llmstack_router_tier_total; `auto` requests only).",
          [Target(f"sum by (tier, tenant) (rate({m('llmstack_router_tier_total')}{{{APP}}}"
                  f"[{RATE}]))", "{{tier}} {{tenant}}")],
          unit="reqps", width=8),
    Panel("Fallbacks",
          "Fallback-chain hops per second: a target left behind (reason: a status code, "
          "timeout, connection, circuit_open, no_key, overloaded, ...) for the next one "
          "(llmstack_fallbacks_total).",
          [Target(f"sum by (from_target, to_target, reason) "
                  f"(rate({m('llmstack_fallbacks_total')}{{{APP}}}[{RATE}]))",
                  "{{from_target}} > {{to_target}} ({{reason}})")],
          unit="reqps", width=8),
    Panel("Circuit breakers",
          "Each provider's breaker, the worst state any replica sees: closed, half-open "
          "(a probe may go out), open (llmstack_circuit_breaker_state).",
          [Target(f"max by (target) ({m('llmstack_circuit_breaker_state')}{{{APP}}})",
                  "{{target}}")],
          kind="state-timeline", width=8,
          options={"showValue": "auto", "mergeValues": True, "rowHeight": 0.8},
          field_defaults={"mappings": BREAKER_MAPPINGS, "min": 0, "max": 2,
                          "color": {"mode": "thresholds"},
                          "thresholds": {"mode": "absolute", "steps": [
                              {"color": "green", "value": None},
                              {"color": "yellow", "value": 1},
                              {"color": "red", "value": 2}]}}),
    Row("Agents"),
    Panel("Agent tool calls",
          "Tool calls per minute by tool (gen_ai.tool.name) and outcome: ok, error, "
          "blocked (a budget or loop guard), denied, expired, interrupted "
          "(llmstack_agent_tool_calls_total).",
          [Target(f"sum by (gen_ai_tool_name, outcome) "
                  f"(rate({m('llmstack_agent_tool_calls_total')}{{{APP}}}[{RATE}])) * 60",
                  "{{gen_ai_tool_name}} {{outcome}}")],
          unit="short"),
    Panel("Agent confirmations",
          "Irreversible tool calls put before a human, per minute: requested, then "
          "approved, denied or expired (llmstack_agent_confirmations_total).",
          [Target(f"sum by (decision) (rate({m('llmstack_agent_confirmations_total')}"
                  f"{{{APP}}}[{RATE}])) * 60", "{{decision}}")],
          unit="short"),
]


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    defaults: dict = {"unit": panel.unit, **panel.field_defaults}
    options: dict = {"tooltip": {"mode": "multi", "sort": "desc"}}
    if panel.kind == "timeseries":
        defaults.setdefault("custom", {"drawStyle": "line", "lineWidth": 1,
                                       "fillOpacity": 10, "showPoints": "never",
                                       "spanNulls": True})
        options["legend"] = {"displayMode": "table", "placement": "bottom",
                             "calcs": ["mean", "lastNotNull", "max"], "showLegend": True}
    options.update(panel.options)
    return {
        "id": panel_id, "type": panel.kind, "title": panel.title,
        "description": panel.description, "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE,
                     "expr": target.expr, "legendFormat": target.legend,
                     "format": target.format, "range": True, "instant": False}
                    for i, target in enumerate(panel.targets)],
    }


def panels() -> list[dict]:
    """Rows and panels laid out on Grafana's 24-column grid, left to right."""
    out: list[dict] = []
    x = y = 0
    row_height = 0
    for panel_id, item in enumerate(LAYOUT, start=1):
        if isinstance(item, Row):
            y += row_height
            x, row_height = 0, 0
            out.append({"id": panel_id, "type": "row", "title": item.title, "collapsed": False,
                        "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
            y += 1
            continue
        if x + item.width > 24:
            x, y = 0, y + row_height
            row_height = 0
        out.append(_panel_json(item, panel_id, x, y))
        x += item.width
        row_height = max(row_height, item.height)
    return out


def dashboard() -> dict:
    return {
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard"}]},
        "description": "LLM production stack on Ray Serve: requests, latency by stage, TTFT, "
                       "tokens, cost, quota, cache, routing and agents. Ray's own Serve "
                       "dashboards (linked above) show replicas, queues and Serve's "
                       "request metrics.",
        "editable": True,
        "graphTooltip": 1,
        "links": [
            {"title": "Ray Serve", "type": "link", "url": "/d/rayServeDashboard",
             "keepTime": True, "includeVars": False, "targetBlank": False, "icon": "dashboard",
             "tags": [], "asDropdown": False, "tooltip": "Ray's Serve dashboard"},
            {"title": "Ray Serve deployments", "type": "link",
             "url": "/d/rayServeDeploymentDashboard", "keepTime": True,
             "includeVars": False, "targetBlank": False, "icon": "dashboard", "tags": [],
             "asDropdown": False, "tooltip": "Ray's Serve deployment dashboard"}],
        "panels": panels(),
        "refresh": "10s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["llmstack", "ray", "serve"],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0, "includeAll": False,
             "multi": False, "options": [], "refresh": 1, "regex": "",
             "skipUrlSync": False},
            {"name": "application", "label": "Serve application", "type": "query",
             "datasource": DATASOURCE,
             "definition": f"label_values({m('llmstack_requests_total')}, application)",
             "query": {"query": f"label_values({m('llmstack_requests_total')}, application)",
                       "refId": "StandardVariableQuery"},
             "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
             "hide": 0, "includeAll": True, "allValue": ".*", "multi": True,
             "options": [], "refresh": 2, "regex": "", "skipUrlSync": False, "sort": 1}]},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "LLM stack",
        "uid": UID,
        "version": 1,
        "weekStart": "",
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="fail if the committed JSON is not what this script writes")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is stale: run python -m dashboards.build_grafana",
                  file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({sum(p['type'] != 'row' for p in dashboard()['panels'])} panels)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
