"""Class 10: file tools refuse anything but regular files and directories, never block
the event loop, time out, and list huge directories in bounded work. Every hang-prone
call runs in a thread of its own with its own event loop, so a regression fails the test
(by timeout) instead of hanging it."""
from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serve_app.agent import workspace_fs as wfs
from serve_app.agent.sandbox import Sandbox
from serve_app.agent.tools import ToolContext, Workspace, default_registry
from tests.support.agent_env import principal, scripted_model, service, settings
from tests.support.scripted_model import answer, tool_call

__all__ = ["scripted_model"]
HANG_S = 15  # generous: only detects a hang


def context(root: Path, **overrides: Any) -> ToolContext:
    agent_settings = settings(**overrides)
    return ToolContext(session_id="s", workspace=Workspace(root), settings=agent_settings,
                       sandbox=Sandbox(agent_settings.sandbox), time_left_s=30,
                       confirmed=True)


def in_own_loop(coro_factory, timeout_s: float = HANG_S) -> Any:
    """Run a coroutine in a fresh thread + loop; fail (not hang) if it does not return."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro_factory())
        except BaseException as error:  # noqa: BLE001 - re-raised below
            box["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        pytest.fail(f"the call did not return within {timeout_s}s (it blocks)")
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "ws"
    root.mkdir()
    os.mkfifo(root / "pipe")
    yield root
    # Release anything a regression left blocked on the FIFO.
    for flags in (os.O_RDONLY | os.O_NONBLOCK, os.O_WRONLY | os.O_NONBLOCK):
        try:
            os.close(os.open(root / "pipe", flags))
        except OSError:
            pass


@pytest.mark.parametrize("tool, arguments", [
    ("files.write", {"path": "pipe", "content": "x"}),
    ("files.write", {"path": "pipe", "content": "x", "append": True}),
    ("files.read", {"path": "pipe"}),
])
def test_fifo_is_refused_without_blocking(root, tool, arguments):
    registry = default_registry()
    outcome = in_own_loop(lambda: registry.run(registry.get(tool), context(root), arguments))
    assert not outcome.ok
    assert "regular file" in outcome.error or "not a file" in outcome.error


def test_other_special_files_are_refused(root):
    registry = default_registry()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "sock"))
    (root / "dev").symlink_to("/dev/zero")  # resolves outside: refused as outside
    try:
        for path in ("sock", "dev"):
            for tool, arguments in (("files.read", {"path": path}),
                                    ("files.write", {"path": path, "content": "x"})):
                outcome = in_own_loop(lambda: registry.run(registry.get(tool), context(root),
                                                           {**arguments}))
                assert not outcome.ok, (tool, path)
    finally:
        server.close()
    listing = in_own_loop(lambda: registry.run(registry.get("files.list"), context(root), {}))
    kinds = {e["name"]: e["type"] for e in listing.result["entries"]}
    assert kinds["pipe"] == kinds["sock"] == kinds["dev"] == "other"


def test_the_event_loop_keeps_running_while_a_file_call_is_stuck(root, monkeypatch):
    """Even I/O that really hangs (a dead mount) only costs a worker thread: the loop
    ticks on and the tool answers with a timeout."""
    release = threading.Event()

    def stuck(path: Path, limit: int) -> bytes:
        release.wait(30)
        return b""

    monkeypatch.setattr(wfs, "read_regular", stuck)
    (root / "a.txt").write_text("x")
    registry = default_registry()

    async def scenario() -> tuple[Any, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.ensure_future(ticker())
        outcome = await registry.run(registry.get("files.read"),
                                     context(root, file_op_timeout_s=0.5),
                                     {"path": "a.txt"})
        task.cancel()
        return outcome, ticks

    try:
        outcome, ticks = in_own_loop(scenario)
    finally:
        release.set()
    assert not outcome.ok and "timed out" in outcome.error
    assert ticks > 5  # the loop was never blocked


def test_huge_directories_are_listed_in_bounded_work(tmp_path):
    root = tmp_path / "ws"
    (root / "big").mkdir(parents=True)
    for i in range(3000):
        (root / "big" / f"f{i:05d}").touch()
    registry = default_registry()
    outcome = in_own_loop(lambda: registry.run(registry.get("files.list"),
                                               context(root, max_list_entries=100),
                                               {"path": "big"}))
    assert outcome.ok and len(outcome.result["entries"]) == 100
    assert outcome.result["truncated"] is True
    names = [e["name"] for e in outcome.result["entries"]]
    assert names == sorted(names)


def test_a_symlink_swapped_in_for_the_last_component_is_not_followed(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    (tmp_path / "link").symlink_to(outside)
    with pytest.raises(OSError):
        wfs.read_regular(tmp_path / "link", 100)  # O_NOFOLLOW: ELOOP
    with pytest.raises(OSError):
        wfs.write_regular(tmp_path / "link", b"x", append=False)
    assert outside.read_text() == "secret"


def test_a_fifo_does_not_hang_the_runner_for_other_sessions(tmp_path, scripted_model):
    """The issue: files.write on a FIFO blocked the AgentRunner for every tenant."""
    alice, operator = principal("key-a"), principal("key-op", can_confirm=True)
    bob = principal("key-b", tenant="t2")
    traps: list[Path] = []

    async def scenario() -> tuple[dict, dict, dict]:
        agent = service(tmp_path, scripted_model)
        try:
            session = await agent.create_session(principal=alice)
            trap = tmp_path / "agent" / "workspaces" / session["id"] / "trap"
            os.mkfifo(trap)
            traps.append(trap)
            scripted_model.script(tool_call("files_write", {"path": "trap", "content": "x"}),
                                  answer("could not write"))
            paused = await agent.post_message(session["id"], "write", principal=alice)
            done = await agent.confirm(session["id"],
                                       paused["pending_confirmation"]["call_id"],
                                       approve=True, principal=operator)
            record = (await agent.audit(session["id"], principal=alice))["data"][0]
            other = await agent.create_session(principal=bob)
            scripted_model.script(answer("still serving"))
            reply = await agent.post_message(other["id"], "hi", principal=bob)
            return done, record, reply
        finally:
            agent.close()

    try:
        done, record, reply = in_own_loop(scenario)
    finally:
        for trap in traps:
            try:
                os.close(os.open(trap, os.O_RDONLY | os.O_NONBLOCK))
            except OSError:
                pass
    assert done["answer"] == "could not write"
    assert record["status"] == "failed" and "regular file" in record["error"]
    assert reply["answer"] == "still serving"
