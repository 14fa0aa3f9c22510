"""A machine-wide pool of sandbox uids: a uid belongs to one run at a time.

A run takes a uid by holding an exclusive `flock` on `<lock_dir>/<uid>.lock`: the kernel
drops the lock when the holder closes it or dies, so a crashed replica never leaks a uid,
and every replica (process) on the machine that uses the same lock_dir sees the same
pool. A uid that still owns a process (a stack using another lock_dir, a leftover) is
skipped as well. Unique uids make RLIMIT_NPROC per run and "kill everything of this uid"
exact.
"""
from __future__ import annotations

import fcntl
import os
import random
import threading
from dataclasses import dataclass
from pathlib import Path

from serve_app.agent.sandbox_limits import pids_of_uid


class UidPoolExhausted(RuntimeError):
    """Every uid of the pool is in use (more concurrent runs than uid_count)."""


@dataclass
class UidLease:
    uid: int
    _fd: int
    _pool: "UidPool"

    def release(self) -> None:
        self._pool._release(self)


class UidPool:
    def __init__(self, base: int, count: int, lock_dir: Path, *, tries: int = 256) -> None:
        self.base = base
        self.count = count
        self.lock_dir = Path(lock_dir)
        self.tries = tries
        self._held: set[int] = set()
        self._lock = threading.Lock()  # flock is per open file, not per thread: guard too

    def acquire(self) -> UidLease:
        self.lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        start = random.randrange(self.count)
        for attempt in range(min(self.tries, self.count)):
            uid = self.base + (start + attempt) % self.count
            with self._lock:
                if uid in self._held:
                    continue
                fd = os.open(self.lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                if pids_of_uid(uid):
                    os.close(fd)
                    continue
                self._held.add(uid)
                return UidLease(uid, fd, self)
        raise UidPoolExhausted(f"no free sandbox uid in {self.base}..{self.base + self.count}")

    def _release(self, lease: UidLease) -> None:
        with self._lock:
            if lease.uid in self._held:
                self._held.discard(lease.uid)
                os.close(lease._fd)

    def held(self) -> set[int]:
        with self._lock:
            return set(self._held)
