"""Escape attempts against the python sandbox (bubblewrap + rlimits): each must fail."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from serve_app.agent.config import SandboxSettings
from serve_app.agent.sandbox import Sandbox
from serve_app.settings import PROJECT_ROOT

SECRET = "sk-agent-test-secret-0123456789"


@pytest.fixture
def sandbox() -> Sandbox:
    return Sandbox(SandboxSettings(wall_seconds=20, cpu_seconds=3, memory_mb=256,
                                   max_processes=8, max_output_bytes=4096, max_file_mb=1,
                                   tmp_mb=2))


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    return tmp_path / "data" / "agent" / "workspaces" / "s1"


async def run(sandbox: Sandbox, workspace: Path, code: str, **kwargs):
    return await sandbox.run_python(code, workspace, "s1", **kwargs)


async def test_code_runs_and_writes_only_its_workspace(sandbox, workspace):
    result = await run(sandbox, workspace, "import os\nopen('out.txt', 'w').write('hi')\n"
                       "print(os.getcwd(), sorted(os.listdir('/')))", write=True)
    assert result.ok, result.stderr
    cwd, listing = result.stdout.split(" ", 1)
    assert cwd == "/workspace"
    assert set(eval(listing)) <= {"bin", "dev", "lib", "lib64", "proc", "sbin", "tmp", "usr",
                                  "workspace"}
    assert (workspace / "out.txt").read_text() == "hi"


async def test_runs_unprivileged_without_capabilities(sandbox, workspace):
    result = await run(sandbox, workspace, "import os\nprint(os.getuid(), os.geteuid())\n"
                       "print([l for l in open('/proc/self/status') if l.startswith('CapEff')"
                       " or l.startswith('NoNewPrivs')])")
    assert result.ok, result.stderr
    uid = int(result.stdout.split()[0])
    assert uid != 0
    assert "CapEff:\\t0000000000000000" in result.stdout
    assert "NoNewPrivs:\\t1" in result.stdout


async def test_no_network_even_to_a_listening_local_port(sandbox, workspace):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        result = await run(sandbox, workspace, f"""
import socket
for host in ('127.0.0.1', '1.1.1.1'):
    try:
        socket.create_connection((host, {port}), timeout=2)
        print('CONNECTED', host)
    except OSError as e:
        print('refused', host, e.errno)
try:
    socket.getaddrinfo('example.com', 80)
    print('RESOLVED')
except OSError:
    print('no dns')
""")
    finally:
        listener.close()
    assert "CONNECTED" not in result.stdout and "RESOLVED" not in result.stdout
    assert result.stdout.count("refused") == 2 and "no dns" in result.stdout


@pytest.mark.parametrize("path", ["/etc/shadow", "/etc/passwd", "/root", "/home",
                                  str(PROJECT_ROOT / "serve_app" / "settings.py"),
                                  str(PROJECT_ROOT / ".venv"), "/work"])
async def test_files_outside_the_workspace_are_not_there(sandbox, workspace, path):
    result = await run(sandbox, workspace, f"""
import os
p = {path!r}
print('EXISTS' if os.path.exists(p) else 'absent')
try:
    open(p).read()
    print('READ')
except OSError as e:
    print('denied', type(e).__name__)
""")
    assert "absent" in result.stdout and "READ" not in result.stdout


async def test_other_workspaces_and_data_dir_are_invisible(sandbox, workspace):
    other = workspace.parent / "s2"
    other.mkdir(parents=True)
    (other / "secret.txt").write_text("other session")
    (workspace.parents[2] / "sessions.sqlite3").write_text("db")
    result = await run(sandbox, workspace, """
import os
print(os.listdir('/workspace'), os.path.exists('/workspace/../s2'), os.listdir('/'))
for p in ('../s2/secret.txt', '/workspace/../s2/secret.txt'):
    try:
        print('READ', open(p).read())
    except OSError:
        print('denied')
""")
    assert "READ" not in result.stdout and "other session" not in result.stdout
    assert result.stdout.count("denied") == 2


async def test_system_dirs_are_read_only(sandbox, workspace):
    result = await run(sandbox, workspace, """
for p in ('/usr/evil', '/usr/bin/python3', '/proc/sys/kernel/hostname'):
    try:
        open(p, 'a').write('x')
        print('WROTE', p)
    except OSError:
        print('denied')
""")
    assert "WROTE" not in result.stdout and result.stdout.count("denied") == 3


async def test_environment_secrets_are_not_visible(sandbox, workspace, monkeypatch):
    monkeypatch.setenv("AGENT_TEST_SECRET", SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    result = await run(sandbox, workspace, """
import os, glob
print(dict(os.environ))
for path in ['/proc/self/environ', '/proc/1/environ', *glob.glob('/proc/[0-9]*/environ')]:
    try:
        print(open(path, 'rb').read())
    except OSError as e:
        print('denied', path)
print(open('/proc/1/cmdline', 'rb').read() if __import__('os').path.exists('/proc/1') else '')
""")
    assert result.ok, result.stderr
    assert SECRET not in result.stdout and "AGENT_TEST_SECRET" not in result.stdout
    assert "OPENAI_API_KEY" not in result.stdout


async def test_host_processes_are_invisible(sandbox, workspace):
    result = await run(sandbox, workspace, """
import os
pids = [p for p in os.listdir('/proc') if p.isdigit()]
print(len(pids))
""")
    assert result.ok, result.stderr
    assert int(result.stdout) <= 3  # bwrap's init, python, maybe a transient one
    assert str(os.getpid()) not in result.stdout.split()


async def test_fork_bomb_is_capped(sandbox, workspace):
    result = await run(sandbox, workspace, """
import os, time
children = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        children += 1
except OSError as e:
    print('fork refused after', children, e.errno)
""")
    assert "fork refused after" in result.stdout
    children = int(result.stdout.split("after")[1].split()[0])
    assert children < 8  # max_processes


async def test_no_process_survives_the_run(sandbox, workspace):
    result = await run(sandbox, workspace, """
import subprocess
subprocess.Popen(['/usr/bin/sleep', '60'])
print('started')
""")
    assert "started" in result.stdout
    uid = result.uid
    if uid == os.getuid():
        pytest.skip("not root: the sandbox shares the service uid")
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _uid(p) == uid]
    assert left == []


async def test_memory_bomb_fails(sandbox, workspace):
    result = await run(sandbox, workspace, """
try:
    block = bytearray(2 * 1024 ** 3)
    print('ALLOCATED')
except MemoryError:
    print('memory error')
""")
    assert "ALLOCATED" not in result.stdout and "memory error" in result.stdout


async def test_infinite_loop_is_killed(sandbox, workspace):
    result = await run(sandbox, workspace, "while True:\n    pass\n", wall_seconds=8)
    assert not result.ok
    # The run's CPU seconds (supervisor) or RLIMIT_CPU (SIGXCPU: 128+24), whichever acts
    # first; the wall clock if the machine is overloaded.
    assert (result.killed in ("cpu_time", "wall_time") or result.exit_code == 128 + 24), \
        result


async def test_sleeping_code_hits_the_wall_clock(sandbox, workspace):
    result = await run(sandbox, workspace, "import time\ntime.sleep(60)\n", wall_seconds=1)
    assert result.killed == "wall_time" and not result.ok


async def test_huge_output_is_cut_and_the_run_killed(sandbox, workspace):
    result = await run(sandbox, workspace, "while True:\n    print('x' * 1000)\n")
    assert result.killed == "output_limit" and result.output_truncated
    assert len(result.stdout) + len(result.stderr) <= 4096


async def test_huge_files_are_refused(sandbox, workspace):
    result = await run(sandbox, workspace, """
for path in ('/workspace/big', '/tmp/big'):
    try:
        with open(path, 'wb') as f:
            f.write(b'x' * (4 * 1024 * 1024))
        print('WROTE', path)
    except OSError as e:
        print('refused', e.errno)
""")
    assert "WROTE" not in result.stdout and result.stdout.count("refused") == 2


def _uid(proc: Path) -> int | None:
    try:
        return proc.stat().st_uid
    except OSError:
        return None
