"""The Grafana dashboard against a real Prometheus (Debian's package) scraping the test
cluster through Ray's service-discovery file: a short load that touches everything the
dashboard charts (auto-routed, streamed, cached, fallen-back, rate-limited requests; an
agent run with a confirmed tool call), then each panel's queries, as Grafana would send
them, must return at least one series (one test per panel). What each query returned goes
to var/test-artifacts/dashboards/panels.json."""
from __future__ import annotations

import json
import math
import re
import time

import httpx
import pytest

from serve_app.settings import PROJECT_ROOT
from tests.support.fake_provider import FakeProvider, Fault
from tests.support.keys import create_key
from tests.support.prometheus import PrometheusServer
from tests.support.scripted_model import ScriptedModel, answer, tool_call

LOCAL = "smollm2-135m-instruct"
DASHBOARD = json.loads((PROJECT_ROOT / "dashboards" / "grafana" / "llmstack.json").read_text())
PANELS = [panel for panel in DASHBOARD["panels"] if panel["type"] != "row"]
# Grafana's variables as a query for the whole stack would have them.
VARIABLES = {"$__rate_interval": "2m", "$application": ".*"}
EASY = "What color is the sky on a clear day?"
SCRAPE_WAIT_S = 120  # Ray reports metrics every ~10 s, Prometheus scrapes every second
ARTIFACTS = PROJECT_ROOT / "var" / "test-artifacts" / "dashboards"
LABELS = ("route", "status", "stage", "tier", "target", "from_target", "to_target", "reason",
          "decision", "outcome", "le", "limit", "match", "gen_ai_request_model",
          "gen_ai_token_type", "gen_ai_tool_name", "tenant", "model")  # kept in panels.json


def promql(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"an unknown Grafana variable in {expr}"
    return expr


@pytest.fixture(scope="module")
def upstreams():
    with FakeProvider(name="fake-good") as good, FakeProvider(name="fake-flaky") as flaky:
        scripted = ScriptedModel(model_name="scripted-model").start()
        yield {"good": good, "flaky": flaky, "scripted": scripted}
        scripted.stop()


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory, upstreams):
    data_dir = tmp_path_factory.mktemp("dashboards")
    fast = {"timeout_s": 5.0, "connect_timeout_s": 1.0,
            "retry": {"max_retries": 0, "backoff_base_s": 0.05, "backoff_max_s": 0.1}}
    cluster.deploy_stack(data_dir, {
        "cache": {"flush_interval_s": 0.2},
        "router": {
            # Every fallback hop is counted: no reordering after a refusal.
            "local": {"price_in_per_mtok": 1000.0, "price_out_per_mtok": 2000.0,
                      "prefer_after_refusal_s": 0},
            "providers": [
                {"name": "fake-good", "base_url": upstreams["good"].base_url,
                 "model": "good-model", "price_in_per_mtok": 500.0,
                 "price_out_per_mtok": 500.0, **fast},
                # One failure opens its breaker, for the rest of the module.
                {"name": "fake-flaky", "base_url": upstreams["flaky"].base_url,
                 "model": "flaky-model", **fast,
                 "circuit_breaker": {"failure_threshold": 1, "reset_s": 600}},
                {"name": "scripted", "base_url": upstreams["scripted"].base_url,
                 "model": "scripted-model", **fast}],
            "tiers": {"small": ["local"], "medium": ["fake-flaky", "fake-good", "local"],
                      "large": ["fake-good", "local"]},
            "policy": {"thresholds": {"small_below": 0.1, "large_from": 0.5}}},
        "agent": {"model": "scripted-model", "default_tools": ["files.write", "files.read"],
                  "llm_max_tokens": 64, "sandbox": {"wall_seconds": 20}}},
        # One Gateway: its breakers are the ones the load trips.
        deployments={"Gateway": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}})
    cluster.keys = {"user": create_key(cluster.base_url, tenant="dash", budget_usd=100.0),
                    "limited": create_key(cluster.base_url, tenant="dash", rpm=1),
                    "operator": create_key(cluster.base_url, tenant="dash", can_confirm=True)}
    return cluster


@pytest.fixture(scope="module")
def prometheus(stack, tmp_path_factory):
    sd_file = stack.prometheus_sd_file
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _sd_targets(sd_file):
        time.sleep(0.5)  # the dashboard writes it every few seconds
    assert _sd_targets(sd_file), f"no metrics targets in {sd_file}"
    with PrometheusServer(sd_file, tmp_path_factory.mktemp("prometheus")) as server:
        yield server


def _sd_targets(sd_file) -> list[str]:
    try:
        return [t for group in json.loads(sd_file.read_text()) for t in group["targets"]]
    except (OSError, ValueError):
        return []


def client(stack, who: str = "user") -> httpx.Client:
    return httpx.Client(base_url=stack.base_url, timeout=120,
                        headers={"authorization": f"Bearer {stack.keys[who]['key']}"})


def chat(stack, content: str, model: str = "auto", who: str = "user",
         headers: dict | None = None) -> httpx.Response:
    with client(stack, who) as http:
        return http.post("/v1/chat/completions", headers=headers or {}, json={
            "model": model, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": content}]})


@pytest.fixture(scope="module")
def results():
    """{panel title: [{query, series: [labels and value]}]}, written once the module ends."""
    found: dict[str, list] = {}
    yield found
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "panels.json").write_text(json.dumps(found, indent=2) + "\n")


def drive(stack, upstreams, round_no: int) -> None:
    """One round of everything the panels chart (a few seconds of requests)."""
    # Routed by the classifier (tiers), answered locally (tokens, cost, budget) and stored;
    # `no-cache` skips the lookup, so every round is routed.
    routed = chat(stack, EASY, headers={"cache-control": "no-cache"})
    assert routed.status_code == 200 and routed.headers["x-route-tier"] == "small", routed.text
    # The same question again: a cache hit (stores are written in the background).
    deadline = time.monotonic() + 30
    while chat(stack, EASY).headers.get("x-cache") != "hit":
        assert time.monotonic() < deadline, "no cache hit"
        time.sleep(0.5)
    # Streamed: time to first token.
    with client(stack) as http:
        with http.stream("POST", "/v1/chat/completions", json={
                "model": LOCAL, "max_tokens": 8, "stream": True,
                "messages": [{"role": "user", "content": f"Count to {round_no + 4}."}]}) as response:
            assert response.status_code == 200
            assert any(line == "data: [DONE]" for line in response.iter_lines())
    # A failing provider: fallback to the next target; its breaker opens after the first
    # failure and it is skipped (circuit_open) from then on.
    upstreams["flaky"].set_default(Fault(status=500))
    for i in range(2):
        response = chat(stack, f"Name a prime number above {10 * round_no + i}.", model="medium")
        assert response.status_code == 200, response.text
        first = round_no == 1 and i == 0
        assert response.headers["x-fallback"] == (
            "fake-flaky:500>fake-good" if first else "fake-flaky:circuit_open>fake-good")
    # A key over its limit (1 a minute): quota rejections, 429s in the error ratio.
    statuses = [chat(stack, f"Say {word} {round_no}.", who="limited").status_code
                for word in ("one", "two")]
    assert statuses[-1] == 429 and (round_no > 1 or statuses[0] == 200), statuses
    # An agent run whose irreversible call a human approves.
    upstreams["scripted"].script(
        tool_call("files_write", {"path": "notes.txt", "content": "hello"}), answer("Written."))
    with client(stack) as http:
        session = http.post("/v1/agent/sessions", json={"goal": "write a note"}).json()
        paused = http.post(f"/v1/agent/sessions/{session['id']}/messages",
                           json={"content": "Write hello to notes.txt"}).json()
    assert paused["status"] == "awaiting_confirmation", paused
    call_id = paused["pending_confirmation"]["call_id"]
    with client(stack, "operator") as http:
        done = http.post(f"/v1/agent/sessions/{session['id']}/confirmations/{call_id}",
                         json={"approve": True}).json()
    assert done["status"] == "completed", done


@pytest.fixture(scope="module")
def load(stack, upstreams, prometheus):
    """Two rounds of load: the first creates every series, the second (once Prometheus has
    scraped them all) moves them, so rates and quantiles over the window show it."""
    drive(stack, upstreams, 1)
    wanted = {name for panel in PANELS for target in panel["targets"]
              for name in re.findall(r"\bray_llmstack_[a-z0-9_]+", target["expr"])}
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while missing := wanted - prometheus.series_names("ray_llmstack_"):
        assert time.monotonic() < deadline, f"never scraped: {sorted(missing)}"
        time.sleep(1)
    drive(stack, upstreams, 2)
    return time.monotonic()


def test_prometheus_scrapes_every_endpoint_of_the_cluster(stack, prometheus):
    deadline = time.monotonic() + 60
    while True:
        targets = prometheus.targets()
        if targets and all(t["health"] == "up" for t in targets):
            break
        assert time.monotonic() < deadline, [(t["scrapeUrl"], t["health"], t["lastError"])
                                             for t in targets]
        time.sleep(1)
    assert {t["labels"]["job"] for t in targets} == {"ray"}
    # The nodes' metrics export ports are among them (Ray's, Serve's and ours).
    import ray
    ports = {str(node["MetricsExportPort"]) for node in ray.nodes() if node["Alive"]}
    assert ports <= {t["scrapeUrl"].split(":")[2].split("/")[0] for t in targets}


@pytest.mark.parametrize("panel", PANELS, ids=[
    re.sub(r"[^a-z0-9]+", "-", p["title"].lower()).strip("-") for p in PANELS])
def test_panel_query_returns_series(panel, load, prometheus, results):
    """Each query returns series, and one of them shows the load (a value above 0)."""
    deadline = load + SCRAPE_WAIT_S
    for target in panel["targets"]:
        query = promql(target["expr"])
        while True:
            series = prometheus.query(query)
            values = [float(s["value"][1]) for s in series]
            if any(math.isfinite(v) and v > 0 for v in values):
                break
            assert time.monotonic() < deadline, (
                f"{panel['title']}: {query} returned {series}; stack metrics scraped: "
                f"{sorted(prometheus.series_names('ray_llmstack_'))}")
            time.sleep(1)
        results.setdefault(panel["title"], []).append({"query": query, "series": [
            {**{k: v for k, v in s["metric"].items() if k in LABELS}, "value": s["value"][1]}
            for s in series]})
