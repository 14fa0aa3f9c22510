"""Handle clients without Ray: what they send, and how often."""
from __future__ import annotations

import asyncio

import pytest

from deployments.handles import CacheClient


class _Method:
    def __init__(self, calls: list, name: str) -> None:
        self.calls, self.name = calls, name

    def remote(self, *args):
        self.calls.append((self.name, args))

        async def done():
            return {}
        return done()


class _Handle:
    def __init__(self) -> None:
        self.calls: list = []

    def __getattr__(self, name: str) -> _Method:
        return _Method(self.calls, name)


async def test_savings_are_summed_per_model_and_sent_at_most_every_two_seconds():
    now = [100.0]
    handle = _Handle()
    client = CacheClient(handle, clock=lambda: now[0])
    for _ in range(50):
        client.record_saving(0.001, "gpt-4o")
    client.record_saving(0.5, "mini")
    assert handle.calls == []  # 51 hits, no round trip yet
    now[0] += CacheClient.SAVINGS_EVERY_S
    client.record_saving(0.001, "gpt-4o")
    sent = {args[1]: args[0] for name, args in handle.calls if name == "record_saving"}
    assert sent == {"gpt-4o": pytest.approx(0.051), "mini": pytest.approx(0.5)}
    client.record_saving(0.2, "mini")
    client.flush_savings()  # what drain() does on shutdown: nothing is left behind
    assert handle.calls[-1] == ("record_saving", (0.2, "mini"))
    await asyncio.gather(*client.background.tasks)
