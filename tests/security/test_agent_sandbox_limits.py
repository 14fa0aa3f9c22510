"""Class 7: sandbox limits hold for a run as a whole (memory, processes, CPU), a session's
workspace has a disk quota across runs and tools, and concurrent runs never share a uid.
Real bwrap runs; each backend that works on this machine is tested (the rlimits fallback
always is)."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from serve_app.agent.config import SandboxSettings
from serve_app.agent.sandbox import Sandbox, WorkspaceQuotaExceeded
from serve_app.agent.sandbox_uids import UidPool, UidPoolExhausted
from serve_app.agent.tools import ToolContext, Workspace, default_registry
from tests.support.agent_env import available_limits, settings

BACKENDS = available_limits()
MB = 1024 * 1024


def make_sandbox(tmp_path: Path, backend: str, **overrides) -> Sandbox:
    values = {"limits": backend, "wall_seconds": 30, "cpu_seconds": 3, "memory_mb": 256,
              "max_processes": 16, "workspace_quota_mb": 8, "max_file_mb": 4,
              "uid_lock_dir": tmp_path / "uids", **overrides}
    return Sandbox(SandboxSettings(**values))


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    return tmp_path / "workspaces" / "s1"


FORK_AND_HOLD = """
import os, select, time
r, w = os.pipe()
for i in range({children}):
    if os.fork() == 0:
        block = bytearray({mb} * 1024 * 1024)
        for j in range(0, len(block), 4096):
            block[j] = 1
        os.write(w, b'1')
        time.sleep(20)
        os._exit(0)
ready, deadline = 0, time.time() + 15
while ready < {children} and time.time() < deadline:
    if select.select([r], [], [], 0.5)[0]:
        ready += len(os.read(r, 64))
print('ALL RESIDENT', ready, flush=True)
"""


async def test_memory_is_capped_for_the_run_not_per_process(tmp_path, workspace, backend):
    """The issue: six forks of 400 MB under a 512 MB limit. Here 4 x 150 MB under 256 MB:
    each fits RLIMIT_AS, together they must not."""
    sandbox = make_sandbox(tmp_path, backend)
    result = await sandbox.run_python(FORK_AND_HOLD.format(children=4, mb=150), workspace, "s1")
    assert "ALL RESIDENT" not in result.stdout, result
    assert result.killed == "memory" and not result.ok
    assert result.limits == backend


async def test_a_run_within_the_memory_cap_is_left_alone(tmp_path, workspace, backend):
    sandbox = make_sandbox(tmp_path, backend)
    result = await sandbox.run_python(FORK_AND_HOLD.format(children=2, mb=40)
                                      .replace("time.sleep(20)", "time.sleep(0)"),
                                      workspace, "s1")
    assert "ALL RESIDENT 2" in result.stdout and result.killed is None, result


async def test_cpu_seconds_are_summed_over_the_run(tmp_path, workspace, backend):
    """3 processes x 2.5 s of CPU: each under RLIMIT_CPU (3 s), the run over 3 s."""
    sandbox = make_sandbox(tmp_path, backend, cpu_cores=4)
    code = """
import os, time
def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
pids = [os.fork() for _ in range(2)]
if 0 in pids:
    burn(2.5)
    os._exit(0)
burn(2.5)
for pid in pids:
    os.waitpid(pid, 0)
print('FINISHED', flush=True)
"""
    result = await sandbox.run_python(code, workspace, "s1")
    assert "FINISHED" not in result.stdout, result
    assert result.killed == "cpu_time", result


async def test_processes_and_threads_are_capped_for_the_run(tmp_path, workspace, backend):
    sandbox = make_sandbox(tmp_path, backend, max_processes=8)
    code = """
import os, threading, time
started = 0
try:
    for i in range(40):
        if i % 2:
            threading.Thread(target=time.sleep, args=(10,), daemon=True).start()
        elif os.fork() == 0:
            time.sleep(10)
            os._exit(0)
        started += 1
except (OSError, RuntimeError) as error:
    print('refused after', started, flush=True)
"""
    result = await sandbox.run_python(code, workspace, "s1", wall_seconds=8)
    assert "refused after" in result.stdout, result
    assert int(result.stdout.split("after")[1].split()[0]) < 8


async def test_concurrent_runs_never_share_a_uid(tmp_path, backend):
    if os.geteuid() != 0:
        pytest.skip("without root every run keeps the service uid (user namespace)")
    sandbox = make_sandbox(tmp_path, backend)
    code = "import os, time\nprint(os.getuid(), flush=True)\ntime.sleep(1.5)\n"
    results = await asyncio.gather(*(
        sandbox.run_python(code, tmp_path / "workspaces" / "same-session", "same-session")
        for _ in range(4)))
    uids = [int(r.stdout.split()[0]) for r in results]
    assert len(set(uids)) == 4 and all(u >= 200_000 for u in uids), results
    assert sandbox.uids.held() == set()  # every uid went back to the pool


def test_uid_pool_is_exclusive_across_replicas(tmp_path):
    """Two pools on one lock dir stand for two replicas on one machine."""
    first, second = (UidPool(300_000, 2, tmp_path / "locks") for _ in range(2))
    a, b = first.acquire(), second.acquire()
    assert a.uid != b.uid
    with pytest.raises(UidPoolExhausted):
        first.acquire()
    with pytest.raises(UidPoolExhausted):
        second.acquire()
    a.release()
    assert second.acquire().uid == a.uid


async def test_disk_quota_holds_across_runs_and_tools(tmp_path, workspace, backend):
    """The issue: 1 GB written in 0.9 s. A writing run stops at the session's quota
    (8 MB), later runs and files.write find no room, the workspace stays under it."""
    sandbox = make_sandbox(tmp_path, backend)
    flood = """
written = 0
try:
    for i in range(1000):
        with open(f'f{{i}}_{tag}', 'wb') as f:
            f.write(b'x' * 1024 * 1024)
        written += 1
except OSError as error:
    print('refused after', written, error.errno, flush=True)
"""
    first = await sandbox.run_python(flood.format(tag="a"), workspace, "s1", write=True)
    assert "refused after" in first.stdout, first
    assert int(first.stdout.split("after")[1].split()[0]) <= 8
    assert sandbox.usage(workspace).bytes <= 8 * MB
    with pytest.raises(WorkspaceQuotaExceeded):
        await sandbox.run_python(flood.format(tag="b"), workspace, "s1", write=True)
    agent_settings = settings(sandbox={"workspace_quota_mb": 8})
    ctx = ToolContext(session_id="s1", workspace=Workspace(workspace),
                      settings=agent_settings, sandbox=sandbox, time_left_s=30,
                      confirmed=True)
    registry = default_registry()
    refused = await registry.run(registry.get("files.write"), ctx,
                                 {"path": "more.txt", "content": "y" * 200_000})
    assert not refused.ok and "quota" in refused.error
    assert not (workspace / "more.txt").exists()
    assert sandbox.usage(workspace).bytes <= 8 * MB
    # Deleting frees the quota again.
    for name in os.listdir(workspace):
        (workspace / name).unlink()
    again = await sandbox.run_python("open('ok.txt', 'w').write('fine')", workspace, "s1",
                                     write=True)
    assert again.ok and (workspace / "ok.txt").read_text() == "fine"


async def test_a_run_over_the_quota_changes_nothing(tmp_path, workspace, backend):
    """Hard links and sparse files are small in the run's tmpfs but not when copied
    back: over the quota, the workspace stays exactly as it was."""
    sandbox = make_sandbox(tmp_path, backend)
    workspace.mkdir(parents=True)
    (workspace / "keep.txt").write_text("before")
    code = """
import os
with open('big', 'wb') as f:
    f.write(b'x' * 3 * 1024 * 1024)
for i in range(5):
    os.link('big', f'link{i}')
os.remove('keep.txt')
print('done', flush=True)
"""
    result = await sandbox.run_python(code, workspace, "s1", write=True)
    assert "done" in result.stdout
    assert result.workspace == "discarded" and "quota" in (result.error or ""), result
    assert sorted(os.listdir(workspace)) == ["keep.txt"]
    assert (workspace / "keep.txt").read_text() == "before"
