"""Admission throughput: admit+settle pairs per second through real Quota shards.

The load runs in this process through the same client a Gateway replica uses
(deployments.handles.QuotaClient: owner-shard routing, batching of concurrent calls) over
real Ray Serve handles to 1, 2 or 4 Quota shards, each its own single-replica deployment,
with the stores on SQLite (files in a temp dir) or PostgreSQL (a throwaway local server,
tests/support/postgres.py). Each pair is what a chat request costs the accounting:
authenticate + reserve (admit), then commit the usage row durably and release (settle).

Modes:
- `single`: one handle call per admit and per settle, as before batching (the baseline).
- `batched`: what ships; calls to one shard that queue while its previous call is in
  flight go as one batch.

For each backend, shard count, mode and concurrency (1, 16, 64) in an interleaved order, a
batch of pairs runs on 64 keys (spread over the shards) with no limits that bind; reported:
pairs/s, p50/p99 of the pair, and CPU ms per pair of the client process plus the Quota
replicas. Writes benchmarks/results/quota_scaling.json.

    python -m benchmarks.quota_scaling [--seconds 4] [--shards 1 2 4] [--backends sqlite postgresql]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import BENCH_ADMIN_KEY, median, percentile, write_result

LEVELS = (1, 16, 64)
KEYS = 64
PG_URL_ENV = "LLMSTACK_BENCH_DATABASE_URL"


def deploy_shards(data_dir: Path, shards: int, backend: str) -> list[Any]:
    """`shards` Quota deployments, each in its own Serve app (no ingress needed)."""
    from ray import serve

    from deployments.quota import Quota
    from serve_app.settings import StackAppSettings

    args: dict[str, Any] = {"data_dir": str(data_dir), "quota": {"shards": shards}}
    if backend == "postgresql":
        args["database"] = {"url_env": PG_URL_ENV}
    settings = StackAppSettings.model_validate(args)
    handles = []
    for shard in range(shards):
        name = "Quota" if shards == 1 else f"Quota-{shard}"
        app = f"quota-{backend}-{shards}-{shard}"
        # As in the stack's config: no access log line per call (it costs the replica CPU).
        deployment = Quota.options(name=name, logging_config={"enable_access_log": False})
        serve.run(deployment.bind(settings, shard), name=app, route_prefix=None)
        handles.append(serve.get_deployment_handle(name, app_name=app))
    return handles


def quota_pids(backend: str, shards: int) -> list[int]:
    """The Quota replicas' processes (their CPU time is part of the cost of a pair)."""
    import ray

    prefix = f"SERVE_REPLICA::quota-{backend}-{shards}-"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(prefix)]
    return [ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(
        lambda _: os.getpid())) for name in names]


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


async def run_pairs(client: Any, keys: list[str], pairs: int, concurrency: int
                    ) -> tuple[list[float], float, int]:
    """`pairs` admit+settle pairs at `concurrency`; (pair latencies ms, wall s, errors)."""
    latencies: list[float] = []
    errors = 0
    next_index = 0

    async def worker() -> None:
        nonlocal next_index, errors
        while next_index < pairs:
            index = next_index
            next_index += 1
            key = keys[index % len(keys)]
            request_id = uuid.uuid4().hex
            started = time.perf_counter()
            try:
                admission = await client.admit(api_key=key, model="m", model_known=True,
                                               tokens=20, cost_usd=0.0, request_id=request_id)
                principal = admission["principal"]
                await client.settle({
                    "request_id": request_id, "tenant_id": principal["tenant_id"],
                    "key_id": principal["key_id"], "route": "/v1/chat/completions",
                    "status": 200, "model": "m", "tokens_in": 10, "tokens_out": 10})
            except Exception:
                errors += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started, errors


async def measure(setups: dict[tuple[str, int], dict[str, Any]], seconds: float,
                  rounds: int) -> list[dict[str, Any]]:
    from deployments.handles import QuotaClient

    me = psutil.Process()
    rows: dict[tuple[str, int, str, int], dict[str, Any]] = {}
    plan = [(setup, mode, level) for setup in setups for mode in ("single", "batched")
            for level in LEVELS]
    for round_index in range(rounds):
        shift = round_index * 7 % len(plan)
        for (backend, shards), mode, level in plan[shift:] + plan[:shift]:
            setup = setups[(backend, shards)]
            client = QuotaClient(setup["handles"], settle_retry_s=0,
                                 batching=mode == "batched")
            # Size each batch from the last rate seen, so each runs about `seconds`.
            row = rows.setdefault((backend, shards, mode, level), {
                "backend": backend, "shards": shards, "mode": mode, "concurrency": level,
                "latencies": [], "wall_s": 0.0, "pairs": 0, "errors": 0, "cpu_s": 0.0})
            rate = row["pairs"] / row["wall_s"] if row["wall_s"] else 40.0 * level ** 0.5
            pairs = max(level * 3, int(rate * seconds / rounds))
            cpu_before = cpu_seconds(setup["pids"]) + sum(me.cpu_times()[:2])
            latencies, wall, errors = await run_pairs(client, setup["keys"], pairs, level)
            cpu_after = cpu_seconds(setup["pids"]) + sum(me.cpu_times()[:2])
            row["latencies"] += latencies
            row["wall_s"] += wall
            row["pairs"] += len(latencies)
            row["errors"] += errors
            row["cpu_s"] += cpu_after - cpu_before
    results = []
    for row in rows.values():
        latencies = row.pop("latencies")
        results.append({**row, "pairs_per_s": round(row["pairs"] / row["wall_s"], 1),
                        "p50_ms": round(median(latencies), 2),
                        "p99_ms": round(percentile(latencies, 99), 2),
                        "cpu_ms_per_pair": round(row["cpu_s"] * 1000 / max(row["pairs"], 1), 3),
                        "wall_s": round(row["wall_s"], 2), "cpu_s": round(row["cpu_s"], 2)})
    return sorted(results, key=lambda r: (r["backend"], r["shards"], r["mode"],
                                          r["concurrency"]))


async def create_keys(handles: list[Any], count: int) -> list[str]:
    from deployments.handles import QuotaClient

    client = QuotaClient(handles, settle_retry_s=0)
    return [(await client.create_key("bench", {}))["key"] for _ in range(count)]


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| backend | shards | mode | c | pairs/s | p50 ms | p99 ms | CPU ms/pair |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['backend']} | {r['shards']} | {r['mode']} | {r['concurrency']} | "
                     f"{r['pairs_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
                     f"{r['cpu_ms_per_pair']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="target seconds per backend/shards/mode/level cell")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--result-name", default="quota_scaling")
    args = parser.parse_args()

    from ray import serve

    from deployments.launch import shutdown_cluster, start_ray

    os.environ["LLMSTACK_ADMIN_KEY"] = BENCH_ADMIN_KEY
    postgres = None
    if "postgresql" in args.backends:
        from tests.support.postgres import PostgresServer, find_bin_dir

        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise SystemExit("PostgreSQL binaries missing: `make test-unit` installs them")
        postgres = PostgresServer(bin_dir)
        os.environ[PG_URL_ENV] = postgres.create_database()
    start_ray(num_cpus=8, dashboard=False)
    try:
        serve.start()
        setups: dict[tuple[str, int], dict[str, Any]] = {}
        for backend in args.backends:
            for shards in args.shards:
                data_dir = Path(tempfile.mkdtemp(prefix=f"quota-bench-{backend}-{shards}-"))
                handles = deploy_shards(data_dir, shards, backend)
                keys = asyncio.run(create_keys(handles, KEYS))
                setups[(backend, shards)] = {"handles": handles, "keys": keys,
                                             "pids": quota_pids(backend, shards)}
        results = asyncio.run(measure(setups, args.seconds, args.rounds))
    finally:
        serve.shutdown()
        shutdown_cluster()
        if postgres is not None:
            postgres.cleanup()
    baseline = next((r for r in results if r["backend"] == "sqlite" and r["shards"] == 1
                     and r["mode"] == "single" and r["concurrency"] == 64), None)
    best = max(results, key=lambda r: r["pairs_per_s"])
    payload = {"levels": list(LEVELS), "keys": KEYS, "seconds_per_cell": args.seconds,
               "results": results,
               "best": {k: best[k] for k in ("backend", "shards", "mode", "concurrency",
                                             "pairs_per_s")},
               "best_vs_single_sqlite_1_shard_c64": round(
                   best["pairs_per_s"] / baseline["pairs_per_s"], 1) if baseline else None}
    path = write_result(args.result_name, payload)
    print(markdown(results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
