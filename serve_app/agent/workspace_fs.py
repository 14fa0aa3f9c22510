"""File-system primitives for session workspaces, safe against hostile trees.

Everything here is synchronous and meant to run in a worker thread (see `run_blocking`):
opens use O_NOFOLLOW | O_NONBLOCK and check S_ISREG with fstat on the opened descriptor, so
a FIFO, a device or a symlink swapped in never blocks or redirects a call; walks use
os.scandir with entry caps, never follow symlinks and never sort more than they read.
"""
from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
_CHUNK = 1 << 20
_MAX_DEPTH = 64
# A dedicated pool: a call stuck in the kernel (a hung mount) occupies one of these
# threads, never the event loop nor the loop's default executor.
_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="agent-files")


class NotRegularFile(OSError):
    """The path is a FIFO, socket, device or symlink: file tools refuse it."""


class QuotaExceeded(OSError):
    """A write or copy would pass the session's disk quota (bytes or entries)."""


class FileOpTimeout(TimeoutError):
    pass


async def run_blocking(fn: Callable[[], T], timeout_s: float) -> T:
    """Run fn in the file pool; the caller gets FileOpTimeout after timeout_s (the thread
    may stay blocked, but the event loop and the session move on)."""
    future = asyncio.get_running_loop().run_in_executor(_POOL, fn)
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout_s)
    except asyncio.TimeoutError as exc:
        raise FileOpTimeout(f"the file operation did not finish in {timeout_s:g}s") from exc


def kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    return "other"


def open_regular(path: Path | str, flags: int, mode: int = 0o644, *,
                 dir_fd: int | None = None) -> int:
    """An fd of a regular file (never follows the last symlink, never blocks on a FIFO)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode,
                 dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{path} is not a regular file")
        # Regular files ignore O_NONBLOCK, but clear it so writes behave normally.
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path, limit: int) -> bytes:
    fd = open_regular(path, os.O_RDONLY)
    try:
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_regular(path: Path, data: bytes, *, append: bool) -> None:
    """Create or replace (or append to) a regular file; refuses anything else there."""
    fd = open_regular(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else 0))
    try:
        if not append:
            os.ftruncate(fd, 0)  # after the S_ISREG check: O_TRUNC would act first
        _write_all(fd, data)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@dataclass
class Listing:
    entries: list[dict[str, object]]
    truncated: bool


def list_dir(path: Path, limit: int) -> Listing:
    """At most `limit` entries (read in directory order, then sorted): a directory of a
    million files costs `limit` reads, not a million."""
    entries: list[dict[str, object]] = []
    truncated = False
    with os.scandir(path) as scan:
        for entry in scan:
            if len(entries) >= limit:
                truncated = True
                break
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            what = kind(info.st_mode)
            entries.append({"name": entry.name, "type": what,
                            "size": info.st_size if what == "file" else None})
    entries.sort(key=lambda e: str(e["name"]))
    return Listing(entries, truncated)


@dataclass
class DiskUsage:
    bytes: int = 0
    entries: int = 0
    over: bool = False  # stopped early: more entries than the cap


def disk_usage(root: Path, max_entries: int) -> DiskUsage:
    """Bytes of regular files and number of entries under root (symlinks not followed)."""
    usage = DiskUsage()
    if not root.is_dir():
        return usage
    todo = [(str(root), 0)]
    while todo:
        directory, depth = todo.pop()
        try:
            scan = os.scandir(directory)
        except OSError:
            continue
        with scan:
            for entry in scan:
                usage.entries += 1
                if usage.entries > max_entries:
                    usage.over = True
                    return usage
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    usage.bytes += max(info.st_size, info.st_blocks * 512)
                elif stat.S_ISDIR(info.st_mode) and depth < _MAX_DEPTH:
                    todo.append((entry.path, depth + 1))
    return usage


@dataclass
class CopyBudget:
    bytes_left: int
    entries_left: int
    owner: int | None = None  # chown every created entry to this uid (copy-in)

    def spend(self, nbytes: int = 0, entries: int = 0) -> None:
        self.bytes_left -= nbytes
        self.entries_left -= entries
        if self.bytes_left < 0 or self.entries_left < 0:
            raise QuotaExceeded("the session's disk quota is used up")


def copy_tree(src_fd: int, dst_fd: int, budget: CopyBudget, depth: int = 0) -> int:
    """Copy directories and regular files from src_fd to dst_fd (both directory fds);
    symlinks, FIFOs, sockets and devices are skipped. Returns how many were skipped.
    Modes are normalised (0644/0755, no setuid): a later run as another uid can read."""
    skipped = 0
    with os.scandir(src_fd) as scan:
        names = [(entry.name, entry.stat(follow_symlinks=False)) for entry in scan]
    for name, info in names:
        if stat.S_ISDIR(info.st_mode):
            if depth >= _MAX_DEPTH:
                skipped += 1
                continue
            budget.spend(entries=1)
            os.mkdir(name, 0o755, dir_fd=dst_fd)
            sub_src = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=src_fd)
            sub_dst = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dst_fd)
            try:
                if budget.owner is not None:
                    os.fchown(sub_dst, budget.owner, budget.owner)
                os.fchmod(sub_dst, 0o755)
                skipped += copy_tree(sub_src, sub_dst, budget, depth + 1)
            finally:
                os.close(sub_src)
                os.close(sub_dst)
        elif stat.S_ISREG(info.st_mode):
            budget.spend(entries=1)
            try:
                source = open_regular(name, os.O_RDONLY, dir_fd=src_fd)
            except (NotRegularFile, OSError):
                skipped += 1
                continue
            mode = 0o755 if info.st_mode & 0o111 else 0o644
            target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, mode, dir_fd=dst_fd)
            try:
                while chunk := os.read(source, _CHUNK):
                    budget.spend(nbytes=len(chunk))
                    _write_all(target, chunk)
                if budget.owner is not None:
                    os.fchown(target, budget.owner, budget.owner)
                os.fchmod(target, mode)
            finally:
                os.close(source)
                os.close(target)
        else:
            skipped += 1
    return skipped


def chown_tree(root: Path, uid: int) -> None:
    """lchown root and everything below it (symlinks themselves, never their targets)."""
    os.lchown(root, uid, uid)
    for directory, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            try:
                os.lchown(os.path.join(directory, name), uid, uid)
            except OSError:
                continue
