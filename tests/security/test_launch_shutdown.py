"""`make run`'s launcher stops on Ctrl-C to its process group (what a terminal sends) and on
SIGTERM to it alone, within the time a user waits, and leaves no process behind: no raylet,
gcs_server, dashboard, Serve replica or vLLM engine. While it runs, its Ray control plane is
private (loopback, token) and the Serve port still answers plain HTTP.

Each case starts `python -m deployments.launch <config>` in a session of its own, with its own
RAY_TMPDIR, dashboard and HTTP ports, so it neither sees nor touches the session-wide test
cluster; no ray.init in this process. One case runs vLLM (the models app, ~1-2 min, ~4 GB),
the others a one-replica app defined here (`tiny_app`).
"""
from __future__ import annotations

import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import pytest
import yaml

from serve_app.settings import PROJECT_ROOT

STOP_LIMIT_S = 45.0  # the launcher's own budget is ~30 s
LEFTOVER_GRACE_S = 10.0
LOOPBACK_ADDRESSES = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def tiny_app(args: dict[str, Any]) -> Any:
    """A one-replica Serve app (the replica imports this module from the project root)."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.01})
    class Tiny:
        async def __call__(self, request: Any) -> str:
            return "ok"

    return Tiny.bind()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Launched:
    process: subprocess.Popen[bytes]
    temp_dir: Path
    http_port: int
    dashboard_port: int

    @property
    def log(self) -> str:
        return (self.temp_dir / "launch.log").read_text(errors="replace")

    @property
    def token(self) -> str:
        return (self.temp_dir / "secrets" / "ray_auth_token").read_text().strip()


def cluster_processes(launched: Launched) -> list[psutil.Process]:
    """Everything the launcher started: its session (Ray workers have process groups of
    their own, vLLM engines are grandchildren of replicas) plus anything whose command line
    or environment names its RAY_TMPDIR (it is inherited by every descendant)."""
    marker = str(launched.temp_dir)
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if process.pid == os.getpid():
                continue
            if (os.getsid(process.pid) == launched.process.pid
                    or marker in " ".join(process.info["cmdline"] or ())
                    or any(marker in v for v in process.environ().values())):
                if process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def describe(processes: list[psutil.Process]) -> list[str]:
    out = []
    for process in processes:
        try:
            out.append(f"{process.pid}:{process.name()}")
        except psutil.Error:
            pass
    return out


@pytest.fixture
def launcher() -> Iterator[Callable[[dict[str, Any]], Launched]]:
    started: list[Launched] = []

    def start(config: dict[str, Any]) -> Launched:
        # Short path: Ray's unix sockets live under it and must stay below 108 characters.
        temp_dir = Path(tempfile.mkdtemp(prefix="launch", dir="/tmp"))
        http_port, dashboard_port = free_port(), free_port()
        config = copy.deepcopy(config)
        config.setdefault("http_options", {}).update(host="127.0.0.1", port=http_port)
        (temp_dir / "config.yaml").write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_TMPDIR=str(temp_dir),
                   RAY_AUTH_TOKEN_PATH=str(temp_dir / "secrets" / "ray_auth_token"),
                   LLMSTACK_NUM_CPUS="4")
        log = open(temp_dir / "launch.log", "wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "deployments.launch", str(temp_dir / "config.yaml"),
             "--dashboard-port", str(dashboard_port)],
            cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()
        launched = Launched(process, temp_dir, http_port, dashboard_port)
        started.append(launched)
        return launched

    yield start
    for launched in started:  # a failed case must not leave a cluster running
        for process in cluster_processes(launched):
            try:
                process.kill()
            except psutil.Error:
                pass
        if launched.process.poll() is None:
            launched.process.kill()
            launched.process.wait(timeout=10)
        shutil.rmtree(launched.temp_dir, ignore_errors=True)


def wait_for_log(launched: Launched, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in launched.log:
            return
        if launched.process.poll() is not None:
            pytest.fail(f"launcher exited ({launched.process.returncode}):\n{launched.log[-4000:]}")
        time.sleep(0.5)
    pytest.fail(f"no {text!r} after {timeout_s}s:\n{launched.log[-4000:]}")


def assert_stops_cleanly(launched: Launched, send_signal: Callable[[], None]) -> float:
    before = cluster_processes(launched)
    assert any(p.name() == "raylet" for p in before), describe(before)
    started = time.monotonic()
    send_signal()
    try:
        launched.process.wait(timeout=STOP_LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"launcher still running {STOP_LIMIT_S}s after the signal; left: "
                    f"{describe(cluster_processes(launched))}\n{launched.log[-4000:]}")
    took = time.monotonic() - started
    assert launched.process.returncode == 0, launched.log[-4000:]
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while (left := cluster_processes(launched)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"left behind: {describe(left)}"
    return took


def group_sigint(launched: Launched) -> Callable[[], None]:
    return lambda: os.killpg(launched.process.pid, signal.SIGINT)


TINY_APP = {"name": "tiny", "route_prefix": "/", "import_path": f"{__name__}:tiny_app"}


def models_config() -> dict[str, Any]:
    """The `models` app of configs/local.yaml (the vLLM engine, the embedder; no route of
    its own) and the tiny app on `/`."""
    config = yaml.safe_load((PROJECT_ROOT / "configs" / "local.yaml").read_text())
    config["applications"] = [a for a in config["applications"] if a["name"] == "models"]
    config["applications"].append(TINY_APP)
    return config


def tiny_config() -> dict[str, Any]:
    return {"proxy_location": "HeadOnly", "applications": [TINY_APP]}


def test_group_sigint_stops_vllm_stack(launcher: Callable[[dict[str, Any]], Launched]) -> None:
    launched = launcher(models_config())
    wait_for_log(launched, "ready:", timeout_s=600)
    names = {p.name() for p in cluster_processes(launched)}
    assert {"raylet", "gcs_server", "VLLM::EngineCore"} <= names, names

    # The Serve port is the data plane: plain HTTP, no Ray token.
    assert httpx.get(f"http://127.0.0.1:{launched.http_port}/", timeout=30).text == "ok"
    # The dashboard and job API are the control plane: token only.
    jobs = f"http://127.0.0.1:{launched.dashboard_port}/api/jobs/"
    assert httpx.get(jobs, timeout=30).status_code == 401
    assert httpx.get(jobs, timeout=30,
                     headers={"authorization": f"Bearer {launched.token}"}).status_code == 200
    assert launched.token not in launched.log
    assert_control_plane_private(launched)

    took = assert_stops_cleanly(launched, group_sigint(launched))
    assert took < STOP_LIMIT_S


def listeners(launched: Launched) -> dict[int, tuple[str, str]]:
    """{port: (bound address, process name)} of every listening TCP socket of the cluster."""
    found: dict[int, tuple[str, str]] = {}
    for process in cluster_processes(launched):
        try:
            for conn in process.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found[conn.laddr.port] = (conn.laddr.ip, process.name())
        except psutil.Error:
            continue
    return found


def assert_control_plane_private(launched: Launched) -> None:
    """Every Ray port binds loopback, except Serve's inter-deployment gRPC server: Ray 2.60
    hard-codes "[::]:0" for it (serve/_private/replica.py), so there the token is the lock."""
    found = listeners(launched)
    assert launched.dashboard_port in found and launched.http_port in found, found
    exposed = {port: where for port, where in found.items()
               if where[0] not in LOOPBACK_ADDRESSES}
    unexpected = {port: where for port, where in exposed.items()
                  if not where[1].startswith("ray::ServeReplica:")}
    assert not unexpected, f"ports bound beyond loopback: {unexpected}"
    for port in exposed:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest",
                                       request_serializer=lambda raw: raw,
                                       response_deserializer=lambda raw: raw)
            with pytest.raises(grpc.RpcError) as refused:
                call(b"", timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_ray_ports_are_private(launcher: Callable[[dict[str, Any]], Launched]) -> None:
    launched = launcher(tiny_config())
    wait_for_log(launched, "ready:", timeout_s=300)
    assert httpx.get(f"http://127.0.0.1:{launched.http_port}/", timeout=30).text == "ok"
    assert_control_plane_private(launched)
    assert_stops_cleanly(launched, group_sigint(launched))


def test_sigterm_to_launcher_alone(launcher: Callable[[dict[str, Any]], Launched]) -> None:
    launched = launcher(tiny_config())
    wait_for_log(launched, "ready:", timeout_s=300)
    assert_stops_cleanly(launched, lambda: os.kill(launched.process.pid, signal.SIGTERM))


def test_repeated_group_sigint(launcher: Callable[[dict[str, Any]], Launched]) -> None:
    """An impatient user presses Ctrl-C three times: no re-entered or interrupted shutdown."""
    launched = launcher(tiny_config())
    wait_for_log(launched, "ready:", timeout_s=300)

    def press_three_times() -> None:
        for _ in range(3):
            os.killpg(launched.process.pid, signal.SIGINT)
            time.sleep(1.0)

    assert_stops_cleanly(launched, press_three_times)


def test_group_sigint_while_deploying(launcher: Callable[[dict[str, Any]], Launched]) -> None:
    launched = launcher(tiny_config())
    wait_for_log(launched, "Started a local Ray instance", timeout_s=300)
    assert_stops_cleanly(launched, group_sigint(launched))
