"""Load test: a mixed workload against the single-node stack and the local multi-node
cluster, same workload, one run (`make bench-load`).

Each target is started the way a user starts it (`python -m deployments.launch` for one
node, `python -m deployments.multinode up` for the cluster), with its shipped config and two
changes: the data dir is a fresh temp dir, and the API providers are one stub provider
(tests/support/fake_provider.py, 0.4 s per answer), since real ones are offline here.

The workload, per virtual user, in a loop:
- FAQ questions, each asked in three phrasings, with SDK defaults (no temperature): the
  cache should catch the repeats and the paraphrases;
- RAG questions against a handbook collection ingested first;
- `auto`-routed prompts of mixed difficulty;
- calls to the API model (the stub);
- a third of all requests streamed (TTFT measured to the first content chunk);
- three tenants with two keys each; one key has an RPM limit that the load exceeds (its
  429s are expected and counted by code).
Concurrency steps up and down (phases), and every second a sampler reads the replica count
of each deployment (Serve's REST API) and the ALIVE nodes (Ray's state API).
`--kill-worker-at S` kills the busiest CPU worker node's raylet S seconds into the cluster
run and records the failed requests and the seconds until answers came back.

Writes benchmarks/results/load_<target>.json for each target, load_summary.json and
load.png (replicas and nodes over time above latency and throughput).

    python -m benchmarks.load [--targets single cluster] [--phases 4:20 16:40 4:20]
                              [--kill-worker-at 50] [--result-name load]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.common import RESULTS_DIR, median, percentile, write_result
from deployments.launch import load_config, ray_control_plane_env
from deployments.multinode import (LOCAL_SERVE_CONFIG, ClusterInspector, free_port,
                                   stack_app)
from serve_app.settings import PROJECT_ROOT

ADMIN_KEY = "load-admin-key-" + "0" * 16
LOCAL = "smollm2-135m-instruct"
API_MODEL = "stub-model"
FAQ = [
    ("How do I reset my password?", "What is the way to reset my password?",
     "How can I reset my password?"),
    ("What are your opening hours?", "When are you open?", "What hours are you open?"),
    ("How do I cancel my subscription?", "How can I cancel my subscription?",
     "What is the way to cancel my subscription?"),
    ("Where can I download my invoice?", "Where do I download my invoice?",
     "How can I download my invoice?"),
    ("Do you ship internationally?", "Do you ship to other countries?",
     "Can you ship internationally?"),
    ("How do I change my email address?", "How can I change my email address?",
     "How do I update my email address?"),
]
RAG_QUESTIONS = ["How many days of paid holiday do employees get?",
                 "When must holidays be booked?", "Which trips need director approval?",
                 "Should I book a train or a flight for a 300 km trip?"]
AUTO_PROMPTS = ["Say hello.", "What is 7 times 8?", "Name a primary colour.",
                "Prove that the square root of 2 is irrational, step by step.",
                "Write a haiku about the sea.",
                "Compare quicksort and mergesort for nearly sorted input and justify it."]
HANDBOOK = ("# Handbook\n\n## Holidays\n\nEvery employee gets 25 days of paid holiday per "
            "year. Holidays must be booked in the HR portal at least two weeks in advance.\n\n"
            "## Travel\n\nBook trains for trips under 500 km. Flights need approval from a "
            "director.\n")


@dataclass
class Sample:
    at: float
    kind: str
    status: int
    latency_s: float
    ttft_s: float | None = None
    cache: str | None = None
    tier: str | None = None


@dataclass
class Run:
    target: str
    started: float = field(default_factory=time.monotonic)
    samples: list[Sample] = field(default_factory=list)
    topology: list[dict[str, Any]] = field(default_factory=list)
    phases: list[dict[str, Any]] = field(default_factory=list)
    node_kill: dict[str, Any] | None = None

    def now(self) -> float:
        return time.monotonic() - self.started


# ------------------------------------------------------------------ targets
class Target:
    """One stack started as its user would start it; stopped by pid (process group)."""

    def __init__(self, name: str, provider_url: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.port = free_port()
        self.dashboard_port = free_port()
        config = load_config(LOCAL_SERVE_CONFIG if name == "cluster"
                             else PROJECT_ROOT / "configs" / "local.yaml")
        config["http_options"]["port"] = self.port
        args = stack_app(config)["args"]
        args["data_dir"] = str(workdir / "data")
        args["router"]["providers"] = [{"name": "stub", "base_url": provider_url,
                                        "model": API_MODEL, "price_in_per_mtok": 0.5,
                                        "price_out_per_mtok": 1.5}]
        args["router"]["tiers"] = {"small": ["local"], "medium": ["stub", "local"],
                                   "large": ["stub", "local"]}
        args.setdefault("agent", {})["model"] = API_MODEL
        self.config_file = workdir / f"{name}.yaml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout_s: float = 900) -> None:
        if self.name == "cluster":
            command = [sys.executable, "-m", "deployments.multinode", "up",
                       str(self.config_file), "--dashboard-port", str(self.dashboard_port)]
        else:
            command = [sys.executable, "-m", "deployments.launch", str(self.config_file),
                       "--dashboard-port", str(self.dashboard_port)]
        env = {**os.environ, "LLMSTACK_ADMIN_KEY": ADMIN_KEY, "LLMSTACK_LOG_TO_DRIVER": "0"}
        log = open(self.workdir / f"{self.name}.log", "ab")
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd=PROJECT_ROOT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.workdir / self.name}.log")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=10).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise TimeoutError(f"{self.name} not ready in {timeout_s} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def admin(base_url: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=120,
                        headers={"authorization": f"Bearer {ADMIN_KEY}"})


def make_keys(base_url: str) -> list[str]:
    """Three tenants, two keys each; the first key of the last tenant is held to 30 RPM."""
    keys: list[str] = []
    with admin(base_url) as client:
        for tenant in ("acme", "globex", "initech"):
            for index in range(2):
                fields: dict[str, Any] = {"tenant_id": tenant}
                if tenant == "initech" and index == 0:
                    fields["rpm"] = 30
                response = client.post("/admin/v1/keys", json=fields)
                response.raise_for_status()
                keys.append(response.json()["key"])
    return keys


def ingest(base_url: str, key: str) -> None:
    with httpx.Client(base_url=base_url, timeout=300,
                      headers={"authorization": f"Bearer {key}"}) as client:
        client.post("/v1/collections/handbook/documents", json={"documents": [
            {"id": "handbook", "title": "Handbook", "content": HANDBOOK,
             "content_type": "text/markdown"}]}).raise_for_status()


# ------------------------------------------------------------------ workload
def request_for(rng: random.Random) -> tuple[str, dict[str, Any]]:
    roll = rng.random()
    if roll < 0.4:
        question = rng.choice(rng.choice(FAQ))
        return "faq", {"model": LOCAL, "max_tokens": 24,
                       "messages": [{"role": "user", "content": question}]}
    if roll < 0.55:
        return "rag", {"model": LOCAL, "max_tokens": 24, "temperature": 0,
                       "rag": {"collection": "handbook", "top_k": 2},
                       "messages": [{"role": "user", "content": rng.choice(RAG_QUESTIONS)}]}
    if roll < 0.8:
        return "auto", {"model": "auto", "max_tokens": 24, "temperature": 0.7,
                        "messages": [{"role": "user", "content": rng.choice(AUTO_PROMPTS)}]}
    return "api", {"model": API_MODEL, "max_tokens": 24, "temperature": 0.7,
                   "messages": [{"role": "user", "content":
                                 f"Summarise ticket {rng.randrange(10_000)}."}]}


async def one_request(client: httpx.AsyncClient, run: Run, key: str,
                      rng: random.Random) -> None:
    kind, body = request_for(rng)
    stream = rng.random() < 1 / 3
    body["stream"] = stream
    at = run.now()
    started = time.monotonic()
    headers = {"authorization": f"Bearer {key}"}
    try:
        if not stream:
            response = await client.post("/v1/chat/completions", json=body, headers=headers)
            run.samples.append(Sample(at, kind, response.status_code,
                                      time.monotonic() - started,
                                      cache=response.headers.get("x-cache"),
                                      tier=response.headers.get("x-route-tier")))
            return
        ttft = None
        async with client.stream("POST", "/v1/chat/completions", json=body,
                                 headers=headers) as response:
            async for line in response.aiter_lines():
                if ttft is None and line.startswith("data:") and '"content"' in line:
                    ttft = time.monotonic() - started
            run.samples.append(Sample(at, kind, response.status_code,
                                      time.monotonic() - started, ttft,
                                      cache=response.headers.get("x-cache"),
                                      tier=response.headers.get("x-route-tier")))
    except httpx.HTTPError:
        run.samples.append(Sample(at, kind, 0, time.monotonic() - started))


async def drive(base_url: str, run: Run, keys: list[str],
                phases: list[tuple[int, float]]) -> None:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        for concurrency, seconds in phases:
            phase_start = run.now()
            stop_at = time.monotonic() + seconds

            async def user(index: int) -> None:
                rng = random.Random(index * 7919 + int(phase_start))
                while time.monotonic() < stop_at:
                    await one_request(client, run, keys[index % len(keys)], rng)

            await asyncio.gather(*(user(i) for i in range(concurrency)))
            run.phases.append({"concurrency": concurrency, "from_s": round(phase_start, 1),
                               "to_s": round(run.now(), 1)})


def sample_topology(inspector: ClusterInspector, run: Run, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        try:
            replicas = {name: len(r) for name, r in inspector.replicas().items()}
            nodes = len(inspector.nodes())
        except (httpx.HTTPError, KeyError, ValueError):
            continue
        run.topology.append({"at": round(run.now(), 1), "nodes": nodes, "replicas": replicas})


def screenshots(dashboard_url: str, run: Run, at_s: float) -> None:
    """The dashboard's Serve and Cluster pages in a real headless Chromium, under load."""
    from benchmarks.dashboard_screenshot import take
    from deployments.multinode import ray_auth_headers

    time.sleep(at_s)
    token = ray_auth_headers().get("Authorization", "").removeprefix("Bearer ")
    try:
        saved = take(dashboard_url, token, RESULTS_DIR)
    except Exception as error:  # noqa: BLE001 - a screenshot must not end the load test
        print(f"dashboard screenshot failed: {error}", file=sys.stderr)
        return
    print(f"dashboard screenshots at {run.now():.0f} s: {[str(p) for p in saved]}")


def kill_worker(inspector: ClusterInspector, run: Run, at_s: float) -> None:
    time.sleep(at_s)
    victim = inspector.busiest_cpu_worker()
    lost = sorted(name for name, running in inspector.replicas().items()
                  if any(r["node_id"] == victim for r in running))
    os.kill(inspector.raylet_pid(victim), signal.SIGKILL)
    run.node_kill = {"at_s": round(run.now(), 1), "lost_deployments": lost}


# ------------------------------------------------------------------ report
def summarise(run: Run, latency_bound_s: float) -> dict[str, Any]:
    ok = [s for s in run.samples if s.status == 200]
    duration = max((p["to_s"] for p in run.phases), default=run.now()) - \
        min((p["from_s"] for p in run.phases), default=0)
    phases = []
    for phase in run.phases:
        inside = [s for s in run.samples if phase["from_s"] <= s.at < phase["to_s"]]
        done = [s for s in inside if s.status == 200]
        seconds = max(phase["to_s"] - phase["from_s"], 1e-9)
        p95 = percentile([s.latency_s for s in done], 95)
        phases.append({**phase, "rps": round(len(done) / seconds, 2),
                       "p50_s": round(median([s.latency_s for s in done]), 3),
                       "p95_s": round(p95, 3), "error_rate": round(
                           1 - len(done) / len(inside), 4) if inside else None,
                       "p95_within_bound": p95 <= latency_bound_s})
    within = [p["rps"] for p in phases if p["p95_within_bound"]]
    cacheable = [s for s in ok if s.kind == "faq"]
    ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
    summary = {
        "target": run.target, "requests": len(run.samples), "ok": len(ok),
        "rps": round(len(ok) / max(duration, 1e-9), 2),
        "latency_s": {"p50": round(median([s.latency_s for s in ok]), 3),
                      "p95": round(percentile([s.latency_s for s in ok], 95), 3),
                      "p99": round(percentile([s.latency_s for s in ok], 99), 3)},
        "ttft_s": {"p50": round(median(ttfts), 3), "p95": round(percentile(ttfts, 95), 3),
                   "p99": round(percentile(ttfts, 99), 3)},
        "errors_by_code": dict(Counter(str(s.status) for s in run.samples if s.status != 200)),
        "cache_hit_rate_faq": round(sum(1 for s in cacheable if s.cache == "hit")
                                    / max(len(cacheable), 1), 3),
        "route_mix_auto": dict(Counter(s.tier or "none" for s in ok if s.kind == "auto")),
        "by_kind": {kind: sum(1 for s in ok if s.kind == kind)
                    for kind in ("faq", "rag", "auto", "api")},
        "latency_bound_s": latency_bound_s,
        "best_rps_with_p95_within_bound": max(within) if within else None,
        "max_replicas": _max_replicas(run.topology),
        "max_nodes": max((t["nodes"] for t in run.topology), default=None),
        "phases": phases,
    }
    if run.node_kill is not None:
        killed = run.node_kill["at_s"]
        # Failures are what the server owes (5xx, dropped connections), not the expected
        # 429s of the limited key.
        failed_after = [s for s in run.samples if s.at >= killed
                        and (s.status >= 500 or s.status == 0)]
        last = max((s.at + s.latency_s for s in failed_after), default=killed)
        # Requests may also wait (Serve queues calls for a replica being restarted): the
        # longest time after the kill without any answer is the interruption seen.
        answers = sorted([killed] + [s.at + s.latency_s for s in run.samples
                                     if s.status == 200 and s.at + s.latency_s >= killed])
        stall = max((b - a for a, b in zip(answers, answers[1:])), default=0.0)
        summary["node_kill"] = {**run.node_kill, "failed_requests": len(failed_after),
                                "seconds_until_last_failure": round(last - killed, 1),
                                "longest_gap_without_an_answer_s": round(stall, 1)}
    return summary


def load_run(path: Path) -> Run:
    """A run as a target's JSON recorded it (samples, topology, phases, node kill)."""
    import json

    recorded = json.loads(path.read_text())
    summary = recorded["summary"]
    run = Run(target=summary["target"], samples=[Sample(**s) for s in recorded["samples"]],
              topology=recorded["topology"])
    run.phases = [{k: p[k] for k in ("concurrency", "from_s", "to_s")}
                  for p in summary["phases"]]
    if "node_kill" in summary:
        run.node_kill = {k: summary["node_kill"][k] for k in ("at_s", "lost_deployments")}
    return run


def _max_replicas(topology: list[dict[str, Any]]) -> dict[str, int]:
    peak: dict[str, int] = {}
    for entry in topology:
        for name, count in entry["replicas"].items():
            peak[name] = max(peak.get(name, 0), count)
    return peak


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(runs), figsize=(6 * len(runs), 9), squeeze=False,
                             sharex="col")
    for column, run in enumerate(runs):
        top, middle, bottom = axes[0][column], axes[1][column], axes[2][column]
        times = [t["at"] for t in run.topology]
        for name in ("Gateway", "Embedder", "LocalLLM", "SemanticCache"):
            top.step(times, [t["replicas"].get(name, 0) for t in run.topology], where="post",
                     label=f"{name} replicas")
        top.step(times, [t["nodes"] for t in run.topology], where="post", label="Ray nodes",
                 color="black", linestyle="--")
        top.set_title(f"{run.target}: replicas and nodes")
        top.legend(fontsize=7, loc="upper left")
        seconds = int(max((s.at for s in run.samples), default=0)) + 1
        ok = Counter(int(s.at) for s in run.samples if s.status == 200)
        bad = Counter(int(s.at) for s in run.samples if s.status not in (200, 429))
        middle.plot(range(seconds), [ok.get(i, 0) for i in range(seconds)], label="200/s")
        middle.plot(range(seconds), [bad.get(i, 0) for i in range(seconds)], label="errors/s")
        middle.set_title("throughput")
        middle.legend(fontsize=7)
        done = sorted((s.at, s.latency_s) for s in run.samples if s.status == 200)
        bottom.scatter([d[0] for d in done], [d[1] for d in done], s=2, alpha=0.4)
        bottom.set_yscale("log")
        bottom.set_title("latency per request (s)")
        bottom.set_xlabel("seconds into the run")
        if run.node_kill:
            for axis in (top, middle, bottom):
                axis.axvline(run.node_kill["at_s"], color="red", linestyle=":")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_target(name: str, provider_url: str, phases: list[tuple[int, float]],
               kill_at: float | None, latency_bound_s: float,
               result_name: str = "load") -> tuple[Run, dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix=f"load-{name}-"))
    target = Target(name, provider_url, workdir)
    print(f"starting {name} (logs in {workdir})", flush=True)
    target.start()
    try:
        keys = make_keys(target.base_url)
        for tenant_key in keys[::2]:  # one key per tenant: each tenant has its handbook
            ingest(target.base_url, tenant_key)
        run = Run(target=name)
        inspector = ClusterInspector(target.dashboard_url)
        stop = threading.Event()
        sampler = threading.Thread(target=sample_topology, args=(inspector, run, stop),
                                   daemon=True)
        sampler.start()
        helpers = []
        if name == "cluster":
            helpers.append(threading.Thread(
                target=screenshots, daemon=True,
                args=(target.dashboard_url, run, min(kill_at or 40.0, 40.0) - 10)))
        if kill_at is not None and name == "cluster":
            helpers.append(threading.Thread(target=kill_worker, daemon=True,
                                            args=(inspector, run, kill_at)))
        for helper in helpers:
            helper.start()
        asyncio.run(drive(target.base_url, run, keys, phases))
        time.sleep(3)
        stop.set()
        sampler.join(10)
        for helper in helpers:
            helper.join(60)
    finally:
        target.stop()
    summary = summarise(run, latency_bound_s)
    write_result(f"{result_name}_{name}", {"summary": summary, "topology": run.topology,
                                  "samples": [s.__dict__ for s in run.samples]})
    return run, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=["single", "cluster"],
                        choices=["single", "cluster"])
    parser.add_argument("--phases", nargs="+", default=["4:20", "16:40", "4:20"],
                        help="concurrency:seconds steps")
    parser.add_argument("--kill-worker-at", type=float, default=None,
                        help="cluster only: kill the busiest CPU worker's raylet at S s")
    parser.add_argument("--latency-bound-s", type=float, default=5.0,
                        help="the p95 bound for 'RPS at p95 under the bound'")
    parser.add_argument("--stub-latency-s", type=float, default=0.4)
    parser.add_argument("--result-name", default="load",
                        help="prefix of the result files (load_<target>.json, load.png)")
    parser.add_argument("--from-results", action="store_true",
                        help="only rebuild the summary and the PNG from the targets' JSON")
    args = parser.parse_args()
    if args.from_results:
        runs = [load_run(RESULTS_DIR / f"{args.result_name}_{name}.json")
                for name in args.targets]
        write_result(f"{args.result_name}_summary", {
            "phases": args.phases, "kill_worker_at": args.kill_worker_at,
            "targets": {run.target: summarise(run, args.latency_bound_s) for run in runs}})
        plot(runs, RESULTS_DIR / f"{args.result_name}.png")
        return 0
    phases = [(int(c), float(s)) for c, s in (p.split(":") for p in args.phases)]
    # The same private control plane as `make run` (the token the dashboard APIs need),
    # inherited by both targets.
    os.environ.update(ray_control_plane_env(PROJECT_ROOT / "var"))

    from tests.support.fake_provider import Fault, FakeProvider

    runs, summaries = [], {}
    with FakeProvider(name="stub", reply="A stub answer for the load test.") as provider:
        provider.set_default(Fault(latency_s=args.stub_latency_s))
        for name in args.targets:
            run, summary = run_target(name, provider.base_url, phases, args.kill_worker_at,
                                      args.latency_bound_s, args.result_name)
            runs.append(run)
            summaries[name] = summary
            print(yaml.safe_dump({name: {k: v for k, v in summary.items() if k != "phases"}},
                                 sort_keys=False), flush=True)
    write_result(f"{args.result_name}_summary", {"phases": args.phases,
                                                 "kill_worker_at": args.kill_worker_at,
                                                 "targets": summaries})
    plot(runs, RESULTS_DIR / f"{args.result_name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
