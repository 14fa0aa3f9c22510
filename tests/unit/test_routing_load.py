"""Load-aware routing: a saturated local target spills to the next target of its chain
(reason `overloaded`) and takes traffic back when the load falls; a provider that answers
429 or has an open breaker goes behind the local target for a while."""
from __future__ import annotations

import asyncio

from serve_app.errors import ApiError
from serve_app.protocol import ChatCompletionRequest
from serve_app.routing.config import RouterSettings
from serve_app.routing.load import LocalLoad, ProviderHealth
from tests.support.chat_harness import LOCAL, ScriptedLocal, context, make_service

KEY = "sk-aaaaaaaaaaaa_" + "b" * 32


def settings(max_running: int | None = None) -> RouterSettings:
    return RouterSettings.model_validate({
        "providers": [{"name": "paid", "base_url": "http://127.0.0.1:9/v1", "model": "paid-1",
                       "api_key_env": "PAID_KEY"}],
        "tiers": {"small": ["local", "paid"], "medium": ["paid", "local"],
                  "large": ["paid", "local"]},
        "local": {"max_running_requests": max_running}})


def small() -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "small", "messages": [{"role": "user", "content": "hi"}]})


async def test_saturated_local_spills_to_the_next_target_and_comes_back() -> None:
    service, _, local, provider = make_service(
        router_settings=settings(max_running=2), environ={"PAID_KEY": "x"},
        local=ScriptedLocal(delay_s=0.3))
    answers = await asyncio.gather(*(service.handle(small(), context(), KEY)
                                     for _ in range(5)))
    models = [a.headers["x-model"] for a in answers]
    assert models.count(LOCAL) == 2 and models.count("paid-1") == 3
    assert all(a.headers["x-fallback"] == "local:overloaded>paid"
               for a in answers if a.headers["x-model"] == "paid-1")
    later = await service.handle(small(), context(), KEY)  # load is gone: local again
    assert later.headers["x-model"] == LOCAL


async def test_engine_reported_load_counts_too() -> None:
    reported = {"running": 5}

    async def poll() -> int:
        return reported["running"]

    load = LocalLoad(4, poll=poll, poll_s=0.0)
    assert load.skip_reason() is None  # first poll starts in the background
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert load.skip_reason() == "overloaded"
    reported["running"] = 1
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert load.skip_reason() is None


async def test_a_provider_that_said_429_goes_behind_local() -> None:
    service, _, local, provider = make_service(router_settings=settings(),
                                               environ={"PAID_KEY": "x"})
    original = provider.calls

    def refusing(name):
        calls = original(name)

        async def complete(request, request_id):
            provider.requests.append(request)
            return ApiError(429, "slow down", code="rate_limited",
                            headers={"retry-after": "60"}).to_payload()

        calls.complete = complete
        return calls

    service.router.chains.remote = refusing
    medium = ChatCompletionRequest.model_validate(
        {"model": "medium", "messages": [{"role": "user", "content": "hi"}]})
    first = await service.handle(medium, context(), KEY)
    assert first.headers["x-fallback"].startswith("paid:429")
    assert len(provider.requests) == 1
    second = await service.handle(medium, context(), KEY)
    assert second.headers["x-model"] == LOCAL and "x-fallback" not in second.headers
    assert len(provider.requests) == 1  # not asked again while it cools down


def test_health_order_keeps_every_target() -> None:
    now = [0.0]
    health = ProviderHealth(cooldown_s=10, clock=lambda: now[0])
    health.refused("a")
    assert health.order(["a", "b", "local", "c"], "local") == ["b", "local", "a", "c"]
    now[0] = 11
    assert health.order(["a", "b", "local"], "local") == ["a", "b", "local"]
