"""The stack on a real multi-node Ray cluster: a head plus worker raylets shaped like
cluster.yaml, started by the command `make cluster-up` runs (deployments/multinode.py) with
configs/cluster-local.yaml. Everything is checked from outside, as an operator would: the
Serve port, the dashboard's REST API (placement, replicas, nodes) and the processes.

The cluster runs beside the session's single-node cluster (tests/conftest.py) as its own
set of processes; this module starts it once and stops it by pid."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai import AsyncOpenAI

from deployments.launch import load_config
from deployments.multinode import (LOCAL_SERVE_CONFIG, ClusterInspector, ClusterState,
                                   free_port, stack_app, state_path)
from serve_app.quota.sharding import shard_of
from tests.support.fake_provider import Fault, FakeProvider
from tests.support.keys import ADMIN_ENV, admin_client, create_key

LOCAL = "smollm2-135m-instruct"
SLOW = "slow-model"
GPU_DEPLOYMENTS = {"LocalLLM", "Embedder"}


class MultiNode(ClusterInspector):
    def __init__(self, state: ClusterState, data_dir: Path, provider: FakeProvider) -> None:
        super().__init__(state.dashboard_url)
        self.state = state
        self.base_url = state.http_url
        self.data_dir = data_dir
        self.provider = provider
        self.keys: dict[str, dict[str, Any]] = {}
        self.shard_keys: list[str] = []

    def client(self, who: str = "user") -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=300,
                            headers={"authorization": f"Bearer {self.keys[who]['key']}"})


def _wait_ready(process: subprocess.Popen, data_dir: Path, log: Path, timeout_s: float) -> None:
    ready = data_dir / "cluster" / "ready"
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if process.poll() is not None:
            raise RuntimeError(f"the cluster exited ({process.returncode}):\n"
                               f"{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the cluster was not ready in {timeout_s} s:\n"
                               f"{log.read_text()[-4000:]}")
        time.sleep(1)


@pytest.fixture(scope="module")
def provider():
    with FakeProvider(name="slow", reply="Slow but sure.") as fake:
        yield fake


@pytest.fixture(scope="module")
def multinode(postgres_server, tmp_path_factory, provider):
    data_dir = tmp_path_factory.mktemp("multinode")
    config = load_config(LOCAL_SERVE_CONFIG)
    config["http_options"]["port"] = free_port()
    args = stack_app(config)["args"]
    # The API providers of gpu.yaml are unreachable offline (and have no keys here); one
    # real HTTP server stands in for a slow provider. Every tier still ends on the local model.
    args["router"]["providers"] = [{"name": "slow", "base_url": provider.base_url,
                                    "model": SLOW, "price_in_per_mtok": 1.0,
                                    "price_out_per_mtok": 2.0}]
    args["router"]["tiers"] = {"small": ["local"], "medium": ["local"], "large": ["local"]}
    args["agent"]["model"] = SLOW
    config_file = data_dir / "cluster-local.yaml"
    config_file.write_text(yaml.safe_dump(config))
    log = data_dir / "launcher.log"
    env = {**os.environ, **ADMIN_ENV, "LLMSTACK_LOG_TO_DRIVER": "0",
           "LLMSTACK_DATABASE_URL": postgres_server.create_database()}
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "deployments.multinode", "up", str(config_file),
             "--data-dir", str(data_dir), "--dashboard-port", str(free_port())],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(process, data_dir, log, timeout_s=900)
        cluster = MultiNode(ClusterState.read(state_path(data_dir)), data_dir, provider)
        cluster.keys = {"user": create_key(cluster.base_url, tenant="cluster")}
        # One key owned by each Quota shard, so a load over them needs every shard.
        owners: dict[int, dict[str, Any]] = {}
        while len(owners) < 2:
            created = create_key(cluster.base_url, tenant="cluster")
            owners.setdefault(shard_of(created["key_id"], 2), created)
        cluster.shard_keys = [owners[0]["key"], owners[1]["key"]]
        yield cluster
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def chat(cluster: MultiNode, model: str = LOCAL, **extra: Any) -> httpx.Response:
    with cluster.client() as client:
        return client.post("/v1/chat/completions", json={
            "model": model, "temperature": 0, "max_tokens": 12,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            **extra})


def test_every_node_type_joins_and_replicas_are_placed_by_their_resource_requests(multinode):
    nodes = multinode.nodes()
    gpu_nodes = {i for i, n in nodes.items() if n["resources_total"].get("GPU", 0) > 0}
    head = [i for i, n in nodes.items() if n["is_head_node"]]
    assert len(head) == 1 and gpu_nodes and len(nodes) >= 3, nodes
    replicas = multinode.replicas()
    assert {"Gateway", "Quota-0", "Quota-1", "SemanticCache", "Retriever", "AgentRunner",
            "ComplexityClassifier", "LocalLLM", "Embedder"} <= set(replicas)
    for name, running in replicas.items():
        assert running, f"{name} has no RUNNING replica"
        on_gpu = {r["node_id"] in gpu_nodes for r in running}
        assert on_gpu == {name in GPU_DEPLOYMENTS}, (name, running)
    # More than one node carries replicas: the stack really is spread over the cluster.
    assert len({r["node_id"] for running in replicas.values() for r in running}) >= 3


def test_chat_cache_rag_and_agent_answer_on_the_cluster(multinode):
    first = chat(multinode)
    assert first.status_code == 200, first.text
    second = chat(multinode)
    assert second.status_code == 200 and second.headers["x-cache"] == "hit"
    with multinode.client() as client:
        ingested = client.post("/v1/collections/handbook/documents", json={"documents": [
            {"id": "holidays", "title": "Holidays",
             "content": "Every employee gets 25 days of paid holiday per year."}]})
        assert ingested.status_code == 201, ingested.text
        answered = client.post("/v1/chat/completions", json={
            "model": LOCAL, "temperature": 0, "max_tokens": 16,
            "rag": {"collection": "handbook", "top_k": 1},
            "messages": [{"role": "user", "content": "How many holiday days do I get?"}]})
        assert answered.status_code == 200, answered.text
        assert answered.headers["x-rag-sources"].startswith("1=holidays@1#")
        session = client.post("/v1/agent/sessions", json={})
        assert session.status_code == 201, session.text
        reply = client.post(f"/v1/agent/sessions/{session.json()['id']}/messages",
                            json={"content": "Say something."})
        assert reply.status_code == 200, reply.text
    with admin_client(multinode.base_url) as admin:
        assert admin.get("/admin/v1/agent/audit/verify").json()["valid"] is True


def _gateway_count(cluster: MultiNode) -> int:
    return len(cluster.replicas().get("Gateway", []))


class _Burst:
    """Concurrent requests to the slow provider in a background thread until stopped."""

    def __init__(self, cluster: MultiNode, concurrency: int) -> None:
        self.cluster, self.concurrency = cluster, concurrency
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with AsyncOpenAI(base_url=f"{self.cluster.base_url}/v1", max_retries=0,
                               api_key=self.cluster.keys["user"]["key"], timeout=120) as api:
            async def worker() -> None:
                while not self.stop.is_set():
                    try:
                        await api.chat.completions.create(
                            model=SLOW, max_tokens=8,
                            messages=[{"role": "user", "content": "slow?"}])
                        self.statuses.append(200)
                    except openai.APIStatusError as error:
                        self.statuses.append(error.status_code)
                    except openai.APIConnectionError:
                        self.statuses.append(0)
            await asyncio.gather(*(worker() for _ in range(self.concurrency)))

    def __enter__(self) -> "_Burst":
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop.set()
        self.thread.join(180)


def _wait_until(predicate, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(1)
    return time.monotonic() - started


def test_a_burst_scales_gateway_replicas_and_cpu_nodes_up_and_back_down(multinode):
    """Replica autoscaling (target_ongoing_requests) drives node autoscaling: five Gateway
    replicas do not fit the head and one CPU worker (configs/cluster-local.yaml), so the
    pending one makes Ray's autoscaler add a CPU worker node, which it removes once idle."""
    nodes_before = len(multinode.nodes())
    assert _gateway_count(multinode) == 1
    multinode.provider.set_default(Fault(latency_s=2.0))
    try:
        with _Burst(multinode, concurrency=24) as burst:
            # 24 requests in flight against target_ongoing_requests 4.
            _wait_until(lambda: _gateway_count(multinode) > 1, 180,
                        "the Gateway scales above its minimum under the burst")
            _wait_until(lambda: len(multinode.nodes()) > nodes_before, 240,
                        "the autoscaler adds a node for the pending Gateway replica")
        assert burst.statuses.count(200) >= len(burst.statuses) * 0.95, burst.statuses
    finally:
        multinode.provider.set_default(None)
    _wait_until(lambda: _gateway_count(multinode) == 1, 240,
                "the Gateway returns to its minimum after the burst")
    _wait_until(lambda: len(multinode.nodes()) == nodes_before, 300,
                "the idle node is removed after the burst")


def test_killing_a_cpu_worker_node_loses_no_row_and_serve_recovers(multinode):
    victim = multinode.busiest_cpu_worker()
    lost = {name for name, running in multinode.replicas().items()
            if any(r["node_id"] == victim for r in running)}
    raylet = multinode.raylet_pid(victim)
    results: list[tuple[float, int, str | None]] = []
    errors: list[str] = []

    async def load(seconds: float) -> None:
        # Keys on both Quota shards, cacheable requests (the cache is asked each time) and
        # `auto` (the classifier decides): whatever the node carried is on the path.
        clients = [AsyncOpenAI(base_url=f"{multinode.base_url}/v1", max_retries=0,
                               api_key=key, timeout=60) for key in multinode.shard_keys]
        started = time.monotonic()

        async def worker(n: int) -> None:
            api, i = clients[n % len(clients)], 0
            while time.monotonic() - started < seconds:
                i += 1
                at = time.monotonic() - started
                try:
                    raw = await api.chat.completions.with_raw_response.create(
                        model=SLOW if i % 2 else "auto", max_tokens=8,
                        messages=[{"role": "user", "content": f"node kill {n}.{i}"}])
                    results.append((at, 200, raw.http_response.headers["x-llmstack-request-id"]))
                except openai.APIStatusError as error:
                    results.append((at, error.status_code, None))
                    errors.append(f"{at:.0f}s {error.status_code} {error.message[:160]}")
                except openai.APIConnectionError:
                    results.append((at, 0, None))
                await asyncio.sleep(0.2)

        try:
            await asyncio.gather(*(worker(n) for n in range(4)))
        finally:
            for client in clients:
                await client.close()

    killed_at = 5.0

    def kill() -> None:
        time.sleep(killed_at)
        os.kill(raylet, signal.SIGKILL)

    killer = threading.Thread(target=kill)
    killer.start()
    asyncio.run(load(75.0))
    killer.join()
    assert victim not in multinode.nodes(), "the killed node is still ALIVE"
    failures = [r for r in results if r[1] != 200]
    after = [r for r in results if r[0] > killed_at]
    last_failure = max((r[0] for r in failures), default=killed_at)
    report = {"lost_deployments": sorted(lost), "requests": len(results),
              "failed": len(failures), "by_status": {str(s): sum(1 for r in results if r[1] == s)
                                                    for s in {r[1] for r in results}},
              "seconds_until_recovery": round(last_failure - killed_at, 1),
              "errors": errors[:3] + errors[-3:]}
    (multinode.data_dir / "node_kill.json").write_text(json.dumps(report))
    print("node kill:", report)
    # The stack answers again within the bound, and keeps answering: the last 15 s of the
    # load are all 200s.
    assert [r for r in after if r[0] > 60 and r[1] != 200] == [], report
    assert last_failure - killed_at < 55, report
    # Serve rescheduled what the node carried.
    _wait_until(lambda: all(multinode.replicas().get(name) for name in lost), 120,
                "every deployment that lost a replica runs again")
    # Every answered request has its committed ledger row.
    with admin_client(multinode.base_url) as admin:
        for _, _, request_id in (r for r in results if r[1] == 200):
            row = admin.get(f"/admin/v1/usage/requests/{request_id}")
            assert row.status_code == 200, request_id
            assert row.json()["status"] == 200
