"""The one error convention across handles: a shell decorated with error_boundary never
raises to its caller; call_handle turns the payload back into the ApiError."""
from __future__ import annotations

import asyncio
import inspect
import logging

import pytest

from deployments.handles import call_handle
from serve_app.errors import ApiError, error_boundary, is_error_payload


def _not_found(error: Exception) -> ApiError:
    return ApiError(404, f"not found: {error.args[0]}", code="not_found")


@error_boundary("test service", code="test_unavailable", mapped={KeyError: _not_found})
class Shell:
    def sync_refusal(self) -> None:
        raise ApiError(429, "slow down", code="rate_limited", headers={"retry-after": "3"})

    async def async_lookup(self, key: str) -> dict:
        raise KeyError(key)

    async def async_bug(self) -> None:
        raise RuntimeError("secret detail /etc/passwd")

    async def stream(self):
        yield {"n": 1}
        raise ValueError("broke mid-way")

    def fine(self) -> int:
        return 7

    async def check_health(self) -> None:
        raise RuntimeError("unhealthy")  # Serve's own hook: must still raise

    def _private(self) -> None:
        raise RuntimeError("not wrapped")


def test_each_kind_of_method_keeps_its_kind():
    assert not inspect.iscoroutinefunction(Shell.sync_refusal)  # stays in Serve's threads
    assert inspect.iscoroutinefunction(Shell.async_lookup)
    assert inspect.isasyncgenfunction(Shell.stream)


async def test_errors_become_payloads_and_come_back_as_the_same_error(caplog):
    shell = Shell()
    refusal = shell.sync_refusal()
    assert is_error_payload(refusal) and refusal["status"] == 429
    assert ApiError.from_payload(refusal).headers == {"retry-after": "3"}
    missing = await shell.async_lookup("k1")
    assert (missing["status"], missing["code"]) == (404, "not_found")
    with caplog.at_level(logging.ERROR):
        bug = await shell.async_bug()
    assert (bug["status"], bug["code"]) == (503, "test_unavailable")
    assert "passwd" not in bug["message"] and "passwd" in caplog.text  # logged, not shown
    chunks = [chunk async for chunk in shell.stream()]
    assert chunks[0] == {"n": 1} and chunks[1]["code"] == "test_unavailable"
    assert shell.fine() == 7
    with pytest.raises(RuntimeError):
        await shell.check_health()
    with pytest.raises(RuntimeError):
        shell._private()


async def test_call_handle_raises_the_payloads_error():
    async def answer(value):
        return value

    with pytest.raises(ApiError) as raised:
        await call_handle(answer(Shell().sync_refusal()), 1.0, "svc", "svc_unavailable")
    assert raised.value.status == 429 and raised.value.headers["retry-after"] == "3"
    assert await call_handle(answer({"ok": 1}), 1.0, "svc", "svc_unavailable") == {"ok": 1}

    class Slow:
        cancelled = False

        def __await__(self):
            return asyncio.sleep(5).__await__()

        def cancel(self):
            Slow.cancelled = True

    with pytest.raises(ApiError) as late:
        await call_handle(Slow(), 0.05, "svc", "svc_unavailable")
    assert late.value.status == 504 and Slow.cancelled
