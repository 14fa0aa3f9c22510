"""Run-wide limits of a sandboxed run: memory, processes and CPU of ALL its processes.

rlimits are per process (six forks of 400 MB each fit under a 512 MB RLIMIT_AS), so a run
also gets one of these backends, picked by `select_backend` (setting `sandbox.limits`):

- cgroup2: a child cgroup per run under a delegated cgroup v2 directory: memory.max (+
  memory.swap.max 0, memory.oom.group 1: one OOM kills the whole run), pids.max, cpu.max;
  CPU seconds read from cpu.stat; cgroup.kill tears the run down.
- cgroup1: the same with the v1 memory, pids and cpu/cpuacct hierarchies (containers and
  VMs that still mount v1): memory.limit_in_bytes (+ memsw), pids.max, cfs quota;
  an OOM kill seen in memory.oom_control kills the rest of the run.
- rlimits (the checked fallback where no cgroup is writable): every run has a uid of its
  own (sandbox_uids.py), so RLIMIT_NPROC of that uid caps the run's processes exactly;
  a supervisor samples the proportional set size (Pss) and CPU time of the run's processes
  every `supervise_interval_s` and kills the whole run past memory_mb or cpu_seconds.
  Between two samples a run can overshoot by what it allocates in that time; RLIMIT_AS per
  process stays the hard bound of any single process.

A process joins its cgroup before it execs anything (`join_prefix`): a tiny `sh` writes
its own pid into cgroup.procs and then execs prlimit/bwrap, so every process of the run
is born inside. A failed join prints JOIN_MARKER, exits 125 and the run never starts.
"""
from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from serve_app.agent.config import SandboxSettings

JOIN_MARKER = "sandbox: could not join the run's cgroup"
_SH = "/bin/sh"
_JOIN = ('n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ 2>/dev/null > "$1" || '
         f'{{ echo "{JOIN_MARKER}" >&2; exit 125; }}; shift; n=$((n-1)); done; exec "$@"')
_GROUP = "llmstack-agent"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class LimitsUnavailable(RuntimeError):
    """The backend asked for cannot work on this machine (the reason says why)."""


@dataclass
class Sample:
    memory_bytes: int = 0
    cpu_s: float = 0.0
    processes: int = 0


class RunLimits(Protocol):
    """One run's limits; created before the run, closed after it."""

    backend: str

    def join_prefix(self) -> list[str]: ...
    def sample(self) -> Sample: ...
    def oom_killed(self) -> bool: ...
    def kill_all(self) -> None: ...
    def close(self) -> None: ...


# ============================================================================ helpers
def _write(path: Path, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)


def _read(path: Path) -> str:
    with open(path) as handle:
        return handle.read()


def _kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _procs(directory: Path) -> list[int]:
    try:
        return [int(line) for line in _read(directory / "cgroup.procs").split()]
    except OSError:
        return []


def _remove_cgroup(directory: Path, timeout_s: float = 5.0) -> None:
    """Kill what is left and rmdir (a cgroup with processes cannot be removed)."""
    deadline = time.monotonic() + timeout_s
    while directory.exists():
        _kill_pids(_procs(directory))
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)


def _mounts() -> list[tuple[str, str, str, str]]:
    """(root, mount point, fstype, super options) of every mount of this process."""
    found = []
    for line in _read(Path("/proc/self/mountinfo")).splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3:
            found.append((fields[3], fields[4], tail[0], tail[2]))
    return found


def _own_cgroups() -> dict[str, str]:
    """controller (or '' for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    own = {}
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            own[name] = path
    return own


def _under(mount_point: str, mount_root: str, path: str) -> Path:
    """The directory of cgroup `path` in a hierarchy mounted at mount_point (whose own
    root is mount_root: a cgroup namespace or a bind mount of a sub-tree)."""
    if mount_root != "/" and (path == mount_root or path.startswith(mount_root + "/")):
        path = path[len(mount_root):]
    return Path(mount_point) / path.lstrip("/")


# ============================================================================ cgroup v2
class CgroupV2Limits:
    backend = "cgroup2"

    def __init__(self, settings: SandboxSettings, parent: Path) -> None:
        self.dir = parent / f"run-{uuid.uuid4().hex[:16]}"
        self.dir.mkdir()
        try:
            controllers = _read(self.dir / "cgroup.controllers").split()
            if not {"memory", "pids"} <= set(controllers):
                raise LimitsUnavailable(f"{parent} does not delegate memory and pids "
                                        f"(has: {' '.join(controllers) or 'none'})")
            memory = settings.memory_mb * 1024 * 1024
            _write(self.dir / "memory.max", str(memory))
            if (self.dir / "memory.swap.max").exists():
                _write(self.dir / "memory.swap.max", "0")
            if (self.dir / "memory.oom.group").exists():
                _write(self.dir / "memory.oom.group", "1")
            _write(self.dir / "pids.max", str(settings.max_processes))
            if "cpu" in controllers:
                period = 100_000
                _write(self.dir / "cpu.max", f"{int(settings.cpu_cores * period)} {period}")
        except (OSError, LimitsUnavailable):
            _remove_cgroup(self.dir)
            raise

    def join_prefix(self) -> list[str]:
        return [_SH, "-c", _JOIN, "sh", "1", str(self.dir / "cgroup.procs")]

    def sample(self) -> Sample:
        result = Sample(processes=len(_procs(self.dir)))
        try:
            result.memory_bytes = int(_read(self.dir / "memory.current"))
            for line in _read(self.dir / "cpu.stat").splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    result.cpu_s = int(value) / 1e6
        except (OSError, ValueError):
            pass
        return result

    def oom_killed(self) -> bool:
        try:
            for line in _read(self.dir / "memory.events").splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except (OSError, ValueError):
            pass
        return False

    def kill_all(self) -> None:
        try:
            _write(self.dir / "cgroup.kill", "1")
        except OSError:
            _kill_pids(_procs(self.dir))

    def close(self) -> None:
        self.kill_all()
        _remove_cgroup(self.dir)


def cgroup2_parent(settings: SandboxSettings) -> Path:
    """The delegated cgroup v2 directory runs are created under (checked, else raises)."""
    if settings.cgroup_parent is not None:
        parent = Path(settings.cgroup_parent)
    else:
        mount = next(((root, point) for root, point, fstype, _ in _mounts()
                      if fstype == "cgroup2"), None)
        own = _own_cgroups().get("")
        if mount is None or own is None:
            raise LimitsUnavailable("no cgroup v2 hierarchy is mounted")
        parent = _under(mount[1], mount[0], own) / _GROUP
    try:
        parent.mkdir(exist_ok=True)
        wanted = {"memory", "pids", "cpu"}
        have = set(_read(parent / "cgroup.controllers").split())
        if not {"memory", "pids"} <= have:
            # Try to delegate from our own cgroup (fails where it holds processes).
            own_dir = parent.parent
            _write(own_dir / "cgroup.subtree_control",
                   " ".join(f"+{c}" for c in wanted & set(
                       _read(own_dir / "cgroup.controllers").split())))
            have = set(_read(parent / "cgroup.controllers").split())
        enabled = set(_read(parent / "cgroup.subtree_control").split())
        missing = (wanted & have) - enabled
        if missing:
            _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))
    except OSError as exc:
        raise LimitsUnavailable(f"cgroup v2 at {parent} is not writable/delegated: "
                                f"{exc.strerror or exc}") from exc
    if not {"memory", "pids"} <= set(_read(parent / "cgroup.subtree_control").split()):
        raise LimitsUnavailable(f"cgroup v2 at {parent}: memory and pids controllers are "
                                "not delegated")
    return parent


# ============================================================================ cgroup v1
class CgroupV1Limits:
    backend = "cgroup1"

    def __init__(self, settings: SandboxSettings, parents: dict[str, Path]) -> None:
        name = f"run-{uuid.uuid4().hex[:16]}"
        self.dirs: dict[str, Path] = {}
        try:
            for controller, parent in parents.items():
                directory = parent / name
                directory.mkdir()
                self.dirs[controller] = directory
            memory = str(settings.memory_mb * 1024 * 1024)
            _write(self.dirs["memory"] / "memory.limit_in_bytes", memory)
            if (self.dirs["memory"] / "memory.memsw.limit_in_bytes").exists():
                _write(self.dirs["memory"] / "memory.memsw.limit_in_bytes", memory)
            _write(self.dirs["pids"] / "pids.max", str(settings.max_processes))
            if "cpu" in self.dirs:
                period = 100_000
                _write(self.dirs["cpu"] / "cpu.cfs_period_us", str(period))
                _write(self.dirs["cpu"] / "cpu.cfs_quota_us",
                       str(int(settings.cpu_cores * period)))
        except OSError:
            self.close()
            raise
        self._oom_base = self._oom_count()

    def join_prefix(self) -> list[str]:
        procs = [str(d / "cgroup.procs") for d in self.dirs.values()]
        return [_SH, "-c", _JOIN, "sh", str(len(procs)), *procs]

    def sample(self) -> Sample:
        memory = self.dirs["memory"]
        result = Sample(processes=len(_procs(memory)))
        try:
            result.memory_bytes = int(_read(memory / "memory.usage_in_bytes"))
            if "cpuacct" in self.dirs:
                result.cpu_s = int(_read(self.dirs["cpuacct"] / "cpuacct.usage")) / 1e9
        except (OSError, ValueError):
            pass
        return result

    def _oom_count(self) -> int:
        try:
            for line in _read(self.dirs["memory"] / "memory.oom_control").splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError, KeyError):
            pass
        return 0

    def oom_killed(self) -> bool:
        return self._oom_count() > self._oom_base

    def kill_all(self) -> None:
        if "memory" in self.dirs:
            _kill_pids(_procs(self.dirs["memory"]))

    def close(self) -> None:
        self.kill_all()
        for directory in self.dirs.values():
            _remove_cgroup(directory)


def cgroup1_parents(settings: SandboxSettings) -> dict[str, Path]:
    """controller -> the directory runs are created under, for memory, pids (required) and
    cpu, cpuacct (optional); checked by creating and removing a probe cgroup."""
    own = _own_cgroups()
    parents: dict[str, Path] = {}
    for root, point, fstype, options in _mounts():
        if fstype != "cgroup":
            continue
        for controller in ("memory", "pids", "cpu", "cpuacct"):
            if controller in options.split(",") and controller in own \
                    and controller not in parents:
                parents[controller] = _under(point, root, own[controller]) / _GROUP
    if "memory" not in parents or "pids" not in parents:
        raise LimitsUnavailable("no cgroup v1 memory and pids hierarchies are mounted")
    for controller, parent in list(parents.items()):
        try:
            parent.mkdir(exist_ok=True)
            probe = parent / f"probe-{uuid.uuid4().hex[:8]}"
            probe.mkdir()
            probe.rmdir()
        except OSError as exc:
            if controller in ("memory", "pids"):
                raise LimitsUnavailable(f"cgroup v1 {controller} at {parent} is not "
                                        f"writable: {exc.strerror or exc}") from exc
            del parents[controller]
    return parents


# ============================================================================ fallback
@dataclass
class SupervisedLimits:
    """No cgroup: RLIMIT_NPROC of the run's own uid caps processes; the supervisor sums
    Pss and CPU time of the run's processes (those of its uid, or bwrap's descendants when
    unprivileged) and kills them all past the cap."""

    uid: int | None  # the run's own uid (privileged), else None
    root_pid: int | None = None
    backend: str = "rlimits"
    _seen_oom: bool = False
    _cpu_by_pid: dict[int, float] = field(default_factory=dict)

    def join_prefix(self) -> list[str]:
        return []

    def started(self, pid: int) -> None:
        self.root_pid = pid

    def pids(self) -> list[int]:
        if self.uid is not None:
            return pids_of_uid(self.uid)
        return descendants(self.root_pid) if self.root_pid else []

    def sample(self) -> Sample:
        pids = self.pids()
        result = Sample(processes=len(pids))
        for pid in pids:
            result.memory_bytes += _pss_bytes(pid)
            cpu = _cpu_seconds(pid)
            if cpu is not None:
                self._cpu_by_pid[pid] = cpu
        # Processes that exited keep their last sample: their time may also show in the
        # reaper's cutime, so this counts it twice at worst (the safe side).
        result.cpu_s = sum(self._cpu_by_pid.values())
        return result

    def oom_killed(self) -> bool:
        return self._seen_oom

    def mark_oom(self) -> None:
        self._seen_oom = True

    def kill_all(self) -> None:
        for _ in range(50):
            pids = self.pids()
            if not pids:
                return
            _kill_pids(pids)
            time.sleep(0.01)

    def close(self) -> None:
        self.kill_all()


def pids_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _stat_fields(int(entry.name))
            if stat:
                children.setdefault(int(stat[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 = state)."""
    try:
        text = _read(Path(f"/proc/{pid}/stat"))
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _cpu_seconds(pid: int) -> float | None:
    fields = _stat_fields(pid)
    if not fields or len(fields) < 15:
        return None
    # utime stime cutime cstime (fields 14-17 of stat(5); index 11-14 here)
    return sum(int(v) for v in fields[11:15]) / _CLK_TCK


def _pss_bytes(pid: int) -> int:
    try:
        for line in _read(Path(f"/proc/{pid}/smaps_rollup")).splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # older kernels: resident set (counts shared pages more than once: safe side)
        return int(_read(Path(f"/proc/{pid}/statm")).split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# ============================================================================ selection
class LimitsFactory:
    """Picks and checks the backend once; `new(uid)` makes one run's limits."""

    def __init__(self, settings: SandboxSettings, privileged: bool) -> None:
        self.settings = settings
        self.privileged = privileged
        self.backend, self.reason, self._parents = self._select()

    def _select(self) -> tuple[str, str, object]:
        wanted = self.settings.limits
        reasons = []
        for backend in ("cgroup2", "cgroup1"):
            if wanted not in ("auto", backend):
                continue
            try:
                parents: object = (cgroup2_parent(self.settings) if backend == "cgroup2"
                                   else cgroup1_parents(self.settings))
                probe = self._make(backend, parents, None)
                probe.close()
                return backend, "", parents
            except (LimitsUnavailable, OSError) as exc:
                reasons.append(f"{backend}: {exc}")
                if wanted == backend:
                    raise LimitsUnavailable(str(exc)) from exc
        if not self.privileged and wanted == "rlimits":
            # Without root the run shares the service uid: RLIMIT_NPROC is not per run.
            reasons.append("rlimits: unprivileged, processes counted per service user")
        return "rlimits", "; ".join(reasons), None

    def _make(self, backend: str, parents: object, uid: int | None) -> RunLimits:
        if backend == "cgroup2":
            assert isinstance(parents, Path)
            return CgroupV2Limits(self.settings, parents)
        if backend == "cgroup1":
            assert isinstance(parents, dict)
            return CgroupV1Limits(self.settings, parents)
        return SupervisedLimits(uid=uid if self.privileged else None)

    def new(self, uid: int | None) -> RunLimits:
        return self._make(self.backend, self._parents, uid)
