"""Ray's control plane is private: without the token the job API refuses to run code, and a
local head listens on 127.0.0.1 only.

A bare head of its own (`ray start --head --block`, no Serve, no models), in its own session
and temp dir, with the environment the launcher uses (deployments.launch.ray_control_plane_env)
and a token file made by serve_app.secrets_store. Stopped by killing that session's
processes by pid; never `ray stop`, which would stop every Ray on the machine. No ray.init in
this process: the session-wide test cluster may be running beside it.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from deployments.launch import ray_control_plane_env

LOOPBACK_ADDRESSES = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
START_TIMEOUT_S = 120


@dataclass
class Head:
    process: subprocess.Popen[bytes]
    temp_dir: Path
    token_path: Path
    env: dict[str, str]
    gcs_port: int
    dashboard_port: int

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_processes(sid: int, marker: str) -> list[psutil.Process]:
    """Processes of that session (Ray's workers have their own process groups) or started
    with the head's temp dir in their command line or environment."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if process.pid == os.getpid():
                continue
            if (os.getsid(process.pid) == sid
                    or marker in " ".join(process.info["cmdline"] or ())
                    or any(marker in v for v in process.environ().values())):
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def kill_session(sid: int, marker: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        procs = session_processes(sid, marker)
        for process in procs:
            try:
                process.send_signal(sig)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    # Nothing of the test session's own cluster (RAY_ADDRESS, its token) may leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    # Short path: Ray's unix sockets live under it and must stay below 108 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayauth", dir="/tmp"))
    with pytest.MonkeyPatch.context() as patch:
        for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            patch.delenv(name, raising=False)
        patch.setenv("RAY_AUTH_MODE", "token")
        control_plane = ray_control_plane_env(temp_dir / "data")
    env = clean_env({**control_plane, "RAY_TMPDIR": str(temp_dir)})
    gcs_port, dashboard_port = free_port(), free_port()
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
               f"--dashboard-agent-listen-port={free_port()}",
               f"--ray-client-server-port={free_port()}",
               f"--metrics-export-port={free_port()}",
               f"--temp-dir={temp_dir / 'ray'}", "--num-cpus=1", "--disable-usage-stats",
               "--include-dashboard=true"]
    log = open(temp_dir / "ray-start.log", "wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    started = Head(process, temp_dir, Path(control_plane["RAY_AUTH_TOKEN_PATH"]), env,
                   gcs_port, dashboard_port)
    try:
        wait_until_up(started)
        yield started
    finally:
        kill_session(process.pid, str(temp_dir))
        process.wait(timeout=10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_until_up(head: Head) -> None:
    """Up = the job API answers an authorised request (its agent starts last)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            break
        try:
            response = httpx.get(f"{head.dashboard}/api/jobs/", timeout=5,
                                 headers={"authorization": f"Bearer {head.token}"})
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1)
    log = (head.temp_dir / "ray-start.log").read_text(errors="replace")[-3000:]
    raise AssertionError(f"ray head not up: {last}\n{log}")


def job_body(marker: Path) -> dict[str, str]:
    # What an attacker would send: a command run as this user on the head.
    return {"entrypoint": f"{sys.executable} -c \"open('{marker}', 'w').write('ran')\""}


def test_token_file_is_private(head: Head) -> None:
    assert stat.S_IMODE(head.token_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(head.token_path.parent.stat().st_mode) == 0o700
    assert len(head.token) == 64


@pytest.mark.parametrize("headers", [
    {},
    {"authorization": "Bearer not-the-token"},
    {"x-ray-authorization": "Bearer not-the-token"},
    {"cookie": "ray-authentication-token=not-the-token"},
], ids=["no-credentials", "wrong-bearer", "wrong-x-ray-authorization", "wrong-cookie"])
def test_job_submission_without_token_is_refused(head: Head, headers: dict[str, str]) -> None:
    marker = head.temp_dir / f"pwned-{len(headers)}-{time.monotonic_ns()}"
    response = httpx.post(f"{head.dashboard}/api/jobs/", json=job_body(marker),
                          headers=headers, timeout=30)
    assert response.status_code in (401, 403), response.text
    listing = httpx.get(f"{head.dashboard}/api/jobs/", headers=headers, timeout=30)
    assert listing.status_code in (401, 403)
    time.sleep(2)
    assert not marker.exists()


def test_job_submission_with_token_runs(head: Head) -> None:
    marker = head.temp_dir / "ran-with-token"
    auth = {"authorization": f"Bearer {head.token}"}
    # The dashboard answers before its job agent has registered ("No available agent to
    # submit job, please try again later", a 500): wait for the agent, not for a status.
    agent_deadline = time.monotonic() + 60
    while True:
        response = httpx.post(f"{head.dashboard}/api/jobs/", json=job_body(marker),
                              headers=auth, timeout=60)
        if ("No available agent" not in response.text
                or time.monotonic() > agent_deadline):
            break
        time.sleep(1)
    assert response.status_code == 200, response.text
    submission_id = response.json()["submission_id"]
    deadline = time.monotonic() + 90
    status = None
    while time.monotonic() < deadline:
        status = httpx.get(f"{head.dashboard}/api/jobs/{submission_id}", headers=auth,
                           timeout=30).json()["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
    assert status == "SUCCEEDED"
    assert marker.read_text() == "ran"


def test_ray_job_cli_needs_the_token(head: Head) -> None:
    """`ray job list` with the launcher's environment works; without a token it is refused."""
    command = [sys.executable, "-m", "ray.scripts.scripts", "job", "list",
               "--address", head.dashboard]
    ok = subprocess.run(command, env=head.env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    anonymous_env = clean_env({"RAY_AUTH_MODE": "disabled",
                               "HOME": str(head.temp_dir)})  # no ~/.ray/auth_token either
    refused = subprocess.run(command, env=anonymous_env, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode != 0
    assert "401" in refused.stdout + refused.stderr or "Authentication" in (
        refused.stdout + refused.stderr)
    assert head.token not in refused.stdout + refused.stderr + ok.stdout + ok.stderr


def test_head_listens_on_loopback_only(head: Head) -> None:
    listening: dict[int, str] = {}
    for process in session_processes(head.process.pid, str(head.temp_dir)):
        try:
            for conn in process.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    listening[conn.laddr.port] = conn.laddr.ip
        except psutil.Error:
            continue
    assert head.gcs_port in listening and head.dashboard_port in listening, listening
    exposed = {port: ip for port, ip in listening.items() if ip not in LOOPBACK_ADDRESSES}
    assert not exposed, f"ports bound beyond loopback: {exposed}"
