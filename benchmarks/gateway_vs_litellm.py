"""This gateway against LiteLLM's proxy, both in front of the same stub upstream, in one
interleaved run.

Targets (all non-streaming chat completions, max_tokens 16, temperature 0):

- direct          the stub upstream itself (tests/support/fake_provider.py, own process)
- gateway_on      this gateway, API key + quota + durable ledger, cache off, routing the
                  explicit provider model to the stub (stack app at /)
- gateway_off     the same with `quota.enabled: false` (no keys, limits or ledger), cache
                  off (stack app at /off)
- cache_exact     this gateway, features on, cache on: the same prompts again (exact hits,
                  stack app at /cache)
- cache_semantic  the same app, paraphrases of cached prompts (semantic hits)
- litellm         LiteLLM's proxy (own venv, .bench-venvs/litellm), master key only (its
                  virtual keys need Prisma's query engine, downloaded by `prisma generate`
                  from binaries.prisma.sh: unreachable offline, ENOTFOUND),
                  `openai/<model>` with api_base = the stub

For each round, each concurrency level (1, 16, 64) and each target in an order rotated per
round, one batch of requests runs; machine noise thus hits all targets alike. Reported per
target and level: p50/p99 latency, added p50/p99 over direct, req/s, CPU ms per request of
the target's own process tree (psutil user+system, before/after each batch), and errors by
status. Writes benchmarks/results/gateway_vs_litellm.json and prints a markdown table.

    python -m benchmarks.gateway_vs_litellm [--requests 160] [--rounds 4] [--quick]

`--requests` is per target and level, split over the rounds; a batch never has fewer than
3 x concurrency requests (`--min-waves`), so the high levels measure a steady state, not one burst.
LiteLLM is installed on first use (python3.11 -m venv + pip, pinned version, idempotent).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.common import BENCH_ADMIN_KEY, median, percentile, write_result
from serve_app.settings import PROJECT_ROOT

MODEL = "stub-model"
PROVIDER = "stub"
PROVIDER_KEY_ENV = "LLMSTACK_BENCH_STUB_KEY"
PROVIDER_KEY = "sk-bench-stub-" + "1" * 24
LITELLM_MASTER_KEY = "sk-bench-litellm-master-" + "2" * 16
# 1.82.7 and 1.82.8 were the compromised (credential-stealing) releases of March 2026;
# 1.82.6 is the last release before them. Pinned exactly; the install is checked for
# stray .pth start-up hooks, which is how the compromised build ran.
LITELLM_VERSION = "1.82.6"
LITELLM_VENV = PROJECT_ROOT / ".bench-venvs" / "litellm"
KNOWN_PTH = {"distutils-precedence.pth"}
PAIRS_FILE = PROJECT_ROOT.parent / "shared" / "data" / "cache" / "gptcache_mock_paraphrases.jsonl"
FALLBACK_PAIRS = [  # used when the shared pairs file is absent
    ("What is the capital of France?", "Which city is the capital of France?"),
    ("How do I reverse a list in Python?", "How can I reverse a Python list?"),
    ("Explain what a hash table is.", "Explain what a hash map is."),
    ("What does HTTP stand for?", "What is HTTP short for?"),
]
LEVELS = (1, 16, 64)
TARGETS = ("direct", "gateway_on", "gateway_off", "cache_exact", "cache_semantic", "litellm")
PROMPT = "Say hello to the benchmark."


# --------------------------------------------------------------------------- LiteLLM venv
def ensure_litellm_venv(log=print) -> Path:
    """LiteLLM's proxy in its own venv (its pins clash with ours); idempotent."""
    python = LITELLM_VENV / "bin" / "python"
    stamp = LITELLM_VENV / f".installed-litellm-{LITELLM_VERSION}"
    if not stamp.exists():
        log(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV} (once)")
        if not python.exists():
            subprocess.run(["python3.11", "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                        f"litellm[proxy]=={LITELLM_VERSION}"], check=True)
        _check_no_startup_hooks()
        stamp.touch()
    _check_no_startup_hooks()
    return LITELLM_VENV / "bin" / "litellm"


def _check_no_startup_hooks() -> None:
    stray = [p.name for p in LITELLM_VENV.glob("lib/python*/site-packages/*.pth")
             if p.name not in KNOWN_PTH]
    if stray:
        raise SystemExit(f"refusing to run LiteLLM: unexpected start-up hooks {stray} in "
                         f"{LITELLM_VENV} (delete the venv and check the release)")


# --------------------------------------------------------------------------- processes
def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None,
               headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2, headers=headers).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout_s} s: {last!r}")


def _free_port() -> int:
    from deployments.local_cluster import free_port

    return free_port()


def start_stub(work: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    log = open(work / "stub.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_provider", "--port", str(port),
         "--name", MODEL, "--api-key", PROVIDER_KEY],
        cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    _wait_http(f"{url}/models", 30, proc)
    return proc, url


def start_litellm(binary: Path, stub_url: str, work: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    config = work / "litellm.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "model_list": [{"model_name": MODEL, "litellm_params": {
            "model": f"openai/{MODEL}", "api_base": stub_url,
            "api_key": f"os.environ/{PROVIDER_KEY_ENV}"}}],
        "general_settings": {"master_key": LITELLM_MASTER_KEY},
        "litellm_settings": {"telemetry": False, "drop_params": True},
    }, indent=1))
    home = work / "litellm-home"
    home.mkdir(exist_ok=True)
    # A scrubbed environment: nothing of ours but the stub's key; no telemetry, no remote
    # cost map, no proxy settings.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "LANG": "C.UTF-8", PROVIDER_KEY_ENV: PROVIDER_KEY, "LITELLM_TELEMETRY": "False",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "NO_PROXY": "*"}
    log = open(work / "litellm.log", "wb")
    proc = subprocess.Popen(
        [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    _wait_http(f"{url}/health/liveliness", 180, proc)
    return proc, f"{url}/v1"


def stop_group(proc: subprocess.Popen | None) -> None:
    """SIGTERM then SIGKILL to the process group we created (start_new_session)."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# --------------------------------------------------------------------------- the stack
def _pin_single_replicas(config: dict[str, Any]) -> None:
    """One replica per deployment: no autoscaling mid-run (LiteLLM runs one worker too)."""
    for application in config["applications"]:
        for deployment in application.get("deployments", []):
            if "autoscaling_config" in deployment:
                deployment.pop("autoscaling_config")
                deployment["num_replicas"] = 1


def start_gateway(stub_url: str, data_dir: Path) -> tuple[Any, dict[str, str]]:
    from deployments.local_cluster import LocalStack

    # The provider key must be in the environment of every Ray process (workers inherit
    # it from this driver), never in a runtime_env.
    os.environ[PROVIDER_KEY_ENV] = PROVIDER_KEY
    os.environ["LLMSTACK_ADMIN_KEY"] = BENCH_ADMIN_KEY
    router = {
        "providers": [{"name": PROVIDER, "base_url": stub_url, "model": MODEL,
                       "api_key_env": PROVIDER_KEY_ENV, "price_in_per_mtok": 0.15,
                       "price_out_per_mtok": 0.60}],
        "tiers": {tier: [PROVIDER, "local"] for tier in ("small", "medium", "large")},
    }
    stack = LocalStack()
    _pin_single_replicas(stack.base_config)
    stack.start()
    stack.deploy_stack(data_dir, {"cache": {"enabled": False}, "router": router}, extra_stacks={
        "stack_off": ("/off", {"quota": {"enabled": False}, "cache": {"enabled": False},
                               "router": router,
                               # no keys exist here: lift the per-address limit on
                               # unauthenticated traffic, or it answers 429 after 60/min
                               "gateway": {"unauthenticated_per_minute": 10_000_000}}),
        "stack_cache": ("/cache", {"cache": {"enabled": True, "flush_interval_s": 0.1},
                                   "router": router}),
    })
    keys = {}
    for prefix in ("", "/cache"):
        response = httpx.post(f"{stack.base_url}{prefix}/admin/v1/keys",
                              json={"tenant_id": "bench"}, timeout=60,
                              headers={"authorization": f"Bearer {BENCH_ADMIN_KEY}"})
        response.raise_for_status()
        keys[prefix] = response.json()["key"]
    return stack, keys


# --------------------------------------------------------------------------- CPU accounting
class CpuSets:
    """CPU seconds (user + system) of named process sets, sampled before/after a batch."""

    def __init__(self, stub: subprocess.Popen, litellm: subprocess.Popen) -> None:
        me = psutil.Process()
        outside = {stub.pid, litellm.pid}
        stub_tree = _tree(stub.pid)
        litellm_tree = _tree(litellm.pid)
        excluded = {p.pid for p in stub_tree + litellm_tree} | outside
        ray_all = [p for p in me.children(recursive=True) if p.pid not in excluded]
        titled = [(p, _title(p)) for p in ray_all]
        proxy = [p for p, t in titled if t.startswith("ray::ProxyActor")]
        embedder = [p for p, t in titled if t.startswith("ray::ServeReplica:models:Embedder")]

        def app(name: str) -> list[psutil.Process]:
            return [p for p, t in titled if t.startswith(f"ray::ServeReplica:{name}:")]

        self.sets: dict[str, list[psutil.Process]] = {
            "stub": stub_tree, "litellm": litellm_tree, "client": [me], "ray_all": ray_all,
            # what a request to each app runs through: Serve's HTTP proxy and the app's
            # replicas (idle ones included); the cache app also uses the embedder
            "gateway_on": proxy + app("stack"), "gateway_off": proxy + app("stack_off"),
            "cache": proxy + app("stack_cache") + embedder,
            "part:proxy": proxy, "part:embedder": embedder,
        }
        for process, title in titled:  # one set per replica, for the breakdown
            if title.startswith("ray::ServeReplica:"):
                _, app_name, deployment = title.split()[0].removeprefix("ray::").split(":")[:3]
                self.sets.setdefault(f"part:{app_name}:{deployment}", []).append(process)
        self.titles = sorted({_short(t) for _, t in titled})

    def sample(self) -> dict[str, float]:
        return {name: sum(_cpu(p) for p in procs) for name, procs in self.sets.items()}


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _title(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()) or process.name()
    except psutil.Error:
        return ""


def _short(title: str) -> str:
    first = title.split()[0] if title.split() else ""
    return first if first.startswith(("ray::", "VLLM::")) else Path(first).name + " " + \
        " ".join(Path(a).name for a in title.split()[1:2])


def _cpu(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
        return times.user + times.system
    except psutil.Error:
        return 0.0


OWN_CPU_SET = {"direct": None, "gateway_on": "gateway_on", "gateway_off": "gateway_off",
               "cache_exact": "cache", "cache_semantic": "cache", "litellm": "litellm"}
APP_OF = {"gateway_on": "stack", "gateway_off": "stack_off", "cache_exact": "stack_cache",
          "cache_semantic": "stack_cache"}


# --------------------------------------------------------------------------- load
@dataclass
class Target:
    name: str
    base_url: str
    headers: dict[str, str]
    prompts: list[str]
    expect: dict[str, str] = field(default_factory=dict)  # response headers required
    semantic: bool = False  # cache hit must have similarity < 1


@dataclass
class Batch:
    latencies_ms: list[float]
    statuses: Counter
    wall_s: float
    cpu_s: dict[str, float]


def _body(prompt: str) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": prompt}]}


def _outcome(target: Target, response: httpx.Response) -> str:
    if response.status_code != 200:
        return str(response.status_code)
    for name, value in target.expect.items():
        if response.headers.get(name) != value:
            return f"200-but-{name}={response.headers.get(name)}"
    if target.semantic and float(response.headers.get("x-cache-similarity", "1")) >= 1.0:
        return "200-but-exact-match"
    return "ok"


async def run_batch(client: httpx.AsyncClient, target: Target, n: int, concurrency: int,
                    cpu: CpuSets) -> Batch:
    latencies: list[float] = []
    statuses: Counter = Counter()
    counter = iter(range(n))
    url = f"{target.base_url}/chat/completions"

    async def worker() -> None:
        for index in counter:
            body = _body(target.prompts[index % len(target.prompts)])
            started = time.perf_counter()
            try:
                response = await client.post(url, json=body, headers=target.headers)
                outcome = _outcome(target, response)
            except httpx.HTTPError as exc:
                outcome = f"exc:{type(exc).__name__}"
            elapsed = (time.perf_counter() - started) * 1000
            statuses[outcome] += 1
            if outcome == "ok":
                latencies.append(elapsed)

    before = cpu.sample()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    after = cpu.sample()
    return Batch(latencies, statuses, wall, {k: after[k] - before[k] for k in after})


async def seed_cache(client: httpx.AsyncClient, base_url: str, key: str, pairs: int,
                     log=print) -> tuple[list[str], list[str]]:
    """Ask each origin once (miss: the stub answers, the answer is stored), then keep the
    origins that hit exactly and the paraphrases that hit semantically."""
    if PAIRS_FILE.exists():
        rows = [json.loads(line) for line in PAIRS_FILE.read_text().splitlines() if line]
        step = max(1, len(rows) // max(1, pairs))
        chosen = [(r["origin"], r["similar"]) for r in rows[::step][:pairs]]
    else:
        chosen = FALLBACK_PAIRS[:pairs]
    headers = {"authorization": f"Bearer {key}"}
    url = f"{base_url}/chat/completions"
    for origin, _ in chosen:
        (await client.post(url, json=_body(origin), headers=headers)).raise_for_status()
    await asyncio.sleep(1.0)  # stores are batched (flush_interval_s 0.1)
    exact, semantic = [], []
    for origin, similar in chosen:
        response = await client.post(url, json=_body(origin), headers=headers)
        if response.status_code == 200 and response.headers.get("x-cache") == "hit":
            exact.append(origin)
        response = await client.post(url, json=_body(similar), headers=headers)
        if (response.status_code == 200 and response.headers.get("x-cache") == "hit"
                and float(response.headers.get("x-cache-similarity", "1")) < 1.0):
            semantic.append(similar)
    log(f"cache seeded: {len(chosen)} prompts, {len(exact)} exact hits, "
        f"{len(semantic)} paraphrases hit semantically")
    return exact, semantic


# --------------------------------------------------------------------------- report
def _breakdown(name: str, rows: list[Batch], total: int) -> dict[str, float] | None:
    """CPU ms per request of each process on a gateway target's path."""
    app = APP_OF.get(name)
    if app is None or not total:
        return None
    parts = ["part:proxy", *sorted(k for k in rows[0].cpu_s if k.startswith(f"part:{app}:"))]
    if name.startswith("cache"):
        parts.append("part:embedder")
    return {part.rsplit(":", 1)[-1]: round(sum(b.cpu_s[part] for b in rows) * 1000 / total, 2)
            for part in parts}


def summarise(batches: dict[str, dict[int, list[Batch]]],
              idle_ms_per_s: dict[str, float]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, by_level in batches.items():
        summary[name] = {}
        for level, rows in by_level.items():
            lat = [x for b in rows for x in b.latencies_ms]
            ok = len(lat)
            total = sum(sum(b.statuses.values()) for b in rows)
            wall = sum(b.wall_s for b in rows)
            own = OWN_CPU_SET[name]
            cpu_own = sum(b.cpu_s[own] for b in rows) if own else None
            errors = Counter()
            for b in rows:
                errors.update({k: v for k, v in b.statuses.items() if k != "ok"})
            summary[name][level] = {
                "requests": total, "ok": ok, "errors": dict(errors),
                "p50_ms": median(lat), "p99_ms": percentile(lat, 99),
                "p50_ms_per_round": [median(b.latencies_ms) for b in rows],
                "req_per_s": ok / wall if wall else float("nan"),
                "cpu_ms_per_request": (cpu_own * 1000 / total) if own and total else None,
                # the same less what the process set burns when idle (health checks,
                # metrics pushes) over the batch's wall time
                "cpu_ms_per_request_net_of_idle":
                    (cpu_own * 1000 - idle_ms_per_s[own] * wall) / total
                    if own and total else None,
                "cpu_breakdown_ms_per_request": _breakdown(name, rows, total),
                "stub_cpu_ms_per_request":
                    sum(b.cpu_s["stub"] for b in rows) * 1000 / total if total else None,
                "client_cpu_ms_per_request":
                    sum(b.cpu_s["client"] for b in rows) * 1000 / total if total else None,
                "ray_all_cpu_ms_per_request":
                    sum(b.cpu_s["ray_all"] for b in rows) * 1000 / total if total else None,
            }
    for name, by_level in summary.items():
        for level, row in by_level.items():
            direct = summary["direct"][level]
            row["added_p50_ms"] = row["p50_ms"] - direct["p50_ms"]
            row["added_p99_ms"] = row["p99_ms"] - direct["p99_ms"]
    return summary


def versus_litellm(summary: dict[str, Any]) -> dict[str, Any]:
    """Each gateway target against LiteLLM, level by level."""
    out: dict[str, Any] = {}
    litellm = summary.get("litellm")
    if not litellm:
        return out
    for name in APP_OF:
        for level, row in summary.get(name, {}).items():
            other = litellm[level]
            out.setdefault(name, {})[level] = {
                "added_p50_ms_minus_litellm": row["added_p50_ms"] - other["added_p50_ms"],
                "added_p99_ms_minus_litellm": row["added_p99_ms"] - other["added_p99_ms"],
                "req_per_s_over_litellm": row["req_per_s"] / other["req_per_s"]
                if other["req_per_s"] else None,
                "cpu_over_litellm": row["cpu_ms_per_request"] / other["cpu_ms_per_request"]
                if row["cpu_ms_per_request"] and other["cpu_ms_per_request"] else None,
            }
    return out


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| target | conc | p50 ms | p99 ms | +p50 vs direct | +p99 vs direct | req/s "
             "| CPU ms/req | net of idle | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for level in sorted({lvl for rows in summary.values() for lvl in rows}):
        for name in summary:
            row = summary[name].get(level)
            if row is None:
                continue
            cpu, net = row["cpu_ms_per_request"], row["cpu_ms_per_request_net_of_idle"]
            errors = ", ".join(f"{k}: {v}" for k, v in sorted(row["errors"].items())) or "-"
            lines.append(
                f"| {name} | {level} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                f"{row['added_p50_ms']:+.1f} | {row['added_p99_ms']:+.1f} | "
                f"{row['req_per_s']:.0f} | {'-' if cpu is None else f'{cpu:.1f}'} | "
                f"{'-' if net is None else f'{net:.1f}'} | {errors} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=160,
                        help="requests per target and concurrency level, over all rounds")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    parser.add_argument("--min-waves", type=int, default=3,
                        help="a batch has at least this many x concurrency requests")
    parser.add_argument("--cache-pairs", type=int, default=40)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 rounds, few requests")
    parser.add_argument("--result-name", default="gateway_vs_litellm")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds, args.min_waves, args.cache_pairs = 16, 2, 1, 10

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    started_at = time.monotonic()
    load_at_start = os.getloadavg()
    binary = ensure_litellm_venv(log)
    work = Path(tempfile.mkdtemp(prefix="bench-gw-litellm-"))
    stub = litellm = stack = None
    try:
        stub, stub_url = start_stub(work)
        log(f"stub upstream at {stub_url}")
        litellm, litellm_url = start_litellm(binary, stub_url, work)
        log(f"litellm {LITELLM_VERSION} at {litellm_url}")
        log("starting Ray + the stack apps (minutes: vLLM loads too)")
        stack, keys = start_gateway(stub_url, work / "data")
        log(f"gateway at {stack.base_url} (ready after {time.monotonic() - started_at:.0f} s)")
        cpu = CpuSets(stub, litellm)
        result = asyncio.run(_measure(args, stub_url, litellm_url, stack.base_url, keys, cpu,
                                      log))
    finally:
        stop_group(litellm)
        stop_group(stub)
        if stack is not None:
            stack.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    summary = summarise(result.pop("batches"), result["idle_cpu_ms_per_s"])
    path = write_result(args.result_name, {
        "config": {
            "requests_per_target_and_level": args.requests, "rounds": args.rounds,
            "levels": args.levels, "min_waves": args.min_waves, "quick": args.quick,
            "request": f"POST /v1/chat/completions model={MODEL} max_tokens=16 temperature=0, "
                       "non-streaming, httpx.AsyncClient (keep-alive to the target; the stub "
                       "closes every connection)",
            "stub": "tests/support/fake_provider.py in its own process (checks the API key)",
            "gateway": "one LocalStack: stack app / (quota + ledger on, cache off), /off "
                       "(quota.enabled false, cache off, unauthenticated_per_minute lifted), "
                       "/cache (features on, cache on); every deployment pinned to 1 "
                       "replica; provider model routed explicitly to the stub; the models "
                       "app (vLLM, embedder) runs beside it",
            "litellm": f"litellm[proxy]=={LITELLM_VERSION} in "
                       f"{LITELLM_VENV.relative_to(PROJECT_ROOT)}, "
                       "one uvicorn worker, master key only (virtual keys, budgets, rate "
                       "limits and spend logs need PostgreSQL and Prisma's query engine; "
                       "`prisma generate` downloads that from binaries.prisma.sh, which "
                       "this machine cannot reach, so none of them run), "
                       "telemetry off, local cost map, default logging",
            "cpu": "psutil user+system of each target's own processes, before/after each "
                   "batch, divided by requests: gateway = Serve HTTP proxy + the app's "
                   "replicas (+ embedder for the cache app); litellm = its process tree; "
                   "direct = none (stub CPU is reported separately)",
            "targets": list(TARGETS),
        },
        **result, "summary": summary, "versus_litellm": versus_litellm(summary),
        "wall_s": time.monotonic() - started_at,
        # other jobs share this machine: the 1/5/15-minute load averages, for context
        "load_average": {"start": load_at_start, "end": os.getloadavg()}})
    table = markdown(summary)
    print("\n## gateway vs LiteLLM (same stub upstream)\n")
    print(table)
    print("\nidle CPU ms/s of each process set: "
          + json.dumps({k: round(v, 1) for k, v in result["idle_cpu_ms_per_s"].items()
                        if not k.startswith("part:")}))
    print(f"written to {path} (total {time.monotonic() - started_at:.0f} s)")


async def _measure(args, stub_url: str, litellm_url: str, gateway_url: str,
                   keys: dict[str, str], cpu: CpuSets, log) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=max(args.levels) + 8,
                          max_keepalive_connections=max(args.levels) + 8)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        exact, semantic = await seed_cache(client, f"{gateway_url}/cache/v1", keys["/cache"],
                                           args.cache_pairs, log)
        on = {"x-model": MODEL}
        hit = {"x-model": MODEL, "x-cache": "hit"}
        targets = {
            "direct": Target("direct", stub_url, {"authorization": f"Bearer {PROVIDER_KEY}"},
                             [PROMPT]),
            "gateway_on": Target("gateway_on", f"{gateway_url}/v1",
                                 {"authorization": f"Bearer {keys['']}"}, [PROMPT], on),
            "gateway_off": Target("gateway_off", f"{gateway_url}/off/v1", {}, [PROMPT], on),
            "cache_exact": Target("cache_exact", f"{gateway_url}/cache/v1",
                                  {"authorization": f"Bearer {keys['/cache']}"}, exact, hit),
            "cache_semantic": Target("cache_semantic", f"{gateway_url}/cache/v1",
                                     {"authorization": f"Bearer {keys['/cache']}"}, semantic,
                                     hit, semantic=True),
            "litellm": Target("litellm", litellm_url,
                              {"authorization": f"Bearer {LITELLM_MASTER_KEY}"}, [PROMPT]),
        }
        skipped = [name for name, t in targets.items() if not t.prompts]
        for name in skipped:
            log(f"skipping {name}: no cache entry to hit")
            targets.pop(name)
        # warm-up (not recorded): each path once serially, then a burst at the top level
        for target in targets.values():
            warm = await run_batch(client, target, 8, 1, cpu)
            burst = await run_batch(client, target, 2 * max(args.levels), max(args.levels), cpu)
            log(f"warm-up {target.name}: {dict(warm.statuses + burst.statuses)}")
        await asyncio.sleep(3)
        before, idle_started = cpu.sample(), time.perf_counter()
        await asyncio.sleep(5)
        idle_s = time.perf_counter() - idle_started
        idle = {k: (v - before[k]) * 1000 / idle_s for k, v in cpu.sample().items()}
        batches: dict[str, dict[int, list[Batch]]] = {n: {lvl: [] for lvl in args.levels}
                                                      for n in targets}
        names = list(targets)
        for round_index in range(args.rounds):
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for level in args.levels:
                n = max(math.ceil(args.requests / args.rounds), args.min_waves * level)
                for name in order:
                    batch = await run_batch(client, targets[name], n, level, cpu)
                    batches[name][level].append(batch)
                log(f"round {round_index + 1}/{args.rounds} c={level}: " + ", ".join(
                    f"{name} {median(batches[name][level][-1].latencies_ms):.1f}ms"
                    for name in names))
    return {"batches": batches, "skipped_targets": skipped, "idle_cpu_ms_per_s": idle,
            "cache_prompts": {"exact": len(exact), "semantic": len(semantic)},
            "process_titles": cpu.titles}


if __name__ == "__main__":
    main()
