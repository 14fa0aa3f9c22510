"""Provider client, retries and circuit breakers against a real HTTP server
(tests/support/fake_provider.py), one test per fault type."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from serve_app.routing.config import RouterSettings
from serve_app.routing.errors import UpstreamError
from serve_app.routing.fallback import FallbackChain, Target
from serve_app.routing.providers import ProviderClient, provider_request
from serve_app.routing.remote import RemoteProviders
from tests.support.fake_provider import FakeProvider, Fault, free_port

MESSAGES = [{"role": "user", "content": "Say hello"}]
REQUEST = {"model": "auto", "messages": MESSAGES, "max_tokens": 50, "min_tokens": 2,
           "temperature": 0, "stream": False}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with FakeProvider("provider-a") as server:
        yield server


@pytest.fixture
def fake_b() -> Iterator[FakeProvider]:
    with FakeProvider("provider-b", reply="Provider b answers.") as server:
        yield server


def settings_for(*servers: FakeProvider, **provider_overrides: Any) -> RouterSettings:
    providers = []
    for server in servers:
        provider = {"name": server.name, "base_url": server.base_url,
                    "model": f"{server.name}-model", "timeout_s": 1.0,
                    "retry": {"max_retries": 1, "backoff_base_s": 0.1, "backoff_max_s": 0.2,
                              "retry_after_cap_s": 5.0},
                    "circuit_breaker": {"failure_threshold": 2, "reset_s": 30}}
        provider.update(provider_overrides)
        providers.append(provider)
    names = [s.name for s in servers]
    return RouterSettings.model_validate({
        "providers": providers,
        "tiers": {"small": ["local"], "medium": names, "large": names}})


def remote(*servers: FakeProvider, clock: Clock | None = None, sleeps: Sleeps | None = None,
           environ: dict[str, str] | None = None, **overrides: Any) -> RemoteProviders:
    return RemoteProviders(settings_for(*servers, **overrides), environ=environ or {},
                           clock=clock or Clock(), sleep=sleeps or Sleeps(), rng=lambda: 1.0)


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or ""
                   for c in chunks if c.get("choices"))


# ----------------------------------------------------------------------------- happy paths
async def test_completion_pass_through(fake):
    result = await remote(fake).chat("provider-a", REQUEST, "req-1")
    assert result["object"] == "chat.completion"
    assert result["choices"][0]["message"]["content"].startswith("Hello from provider-a")
    assert result["usage"]["total_tokens"] == (result["usage"]["prompt_tokens"]
                                               + result["usage"]["completion_tokens"])
    sent = fake.requests[-1]
    assert sent["model"] == "provider-a-model"          # the provider's model id
    assert "min_tokens" not in sent                     # vLLM-only fields stay here
    assert sent["max_tokens"] == 50 and sent["temperature"] == 0
    assert fake.headers[-1]["x-request-id"] == "req-1"


async def test_stream_pass_through_with_usage(fake):
    chunks = [c async for c in remote(fake).chat_stream("provider-a", REQUEST, "req-2")]
    assert text_of(chunks) == fake.reply
    assert chunks[-1]["usage"]["completion_tokens"] == len(fake.reply.split())
    assert not chunks[-1]["choices"]
    assert fake.requests[-1]["stream_options"] == {"include_usage": True}


async def test_api_key_comes_from_the_environment(fake):
    fake.api_key = "sk-test-123"
    ok = remote(fake, api_key_env="FAKE_KEY", environ={"FAKE_KEY": "sk-test-123"})
    assert (await ok.chat("provider-a", REQUEST, "r"))["object"] == "chat.completion"
    wrong = remote(fake, api_key_env="FAKE_KEY", environ={"FAKE_KEY": "sk-wrong"})
    result = await wrong.chat("provider-a", REQUEST, "r")
    assert result["__error__"] and result["hop"] == "auth" and result["status"] == 502
    assert "sk-wrong" not in result["message"] and "sk-test" not in result["message"]


async def test_no_key_is_refused_without_calling(fake):
    providers = remote(fake, api_key_env="MISSING_KEY")
    result = await providers.chat("provider-a", REQUEST, "r")
    assert result["code"] == "no_key" and result["hop"] == "no_key"
    chunks = [c async for c in providers.chat_stream("provider-a", REQUEST, "r")]
    assert chunks[0]["code"] == "no_key"
    assert fake.calls == 0
    assert providers.status()["provider-a"]["has_key"] is False


async def test_unknown_provider(fake):
    result = await remote(fake).chat("nope", REQUEST, "r")
    assert result["status"] == 404


# ----------------------------------------------------------------------------- faults
async def test_500_is_retried_then_succeeds(fake):
    sleeps = Sleeps()
    fake.enqueue(Fault(status=500))
    result = await remote(fake, sleeps=sleeps).chat("provider-a", REQUEST, "r")
    assert result["object"] == "chat.completion"
    assert fake.calls == 2 and sleeps.delays == [0.1]


async def test_persistent_500_returns_an_error_payload(fake):
    fake.set_default(Fault(status=503))
    result = await remote(fake).chat("provider-a", REQUEST, "r")
    assert result["__error__"] and result["hop"] == "503" and result["status"] == 503
    assert fake.calls == 2  # one try + one retry


async def test_429_retry_after_is_honoured(fake):
    sleeps = Sleeps()
    fake.enqueue(Fault(status=429, retry_after="2"))
    result = await remote(fake, sleeps=sleeps).chat("provider-a", REQUEST, "r")
    assert result["object"] == "chat.completion"
    assert sleeps.delays == [2.0]


async def test_429_retry_after_ms_is_honoured(fake):
    sleeps = Sleeps()
    fake.enqueue(Fault(status=429, retry_after_ms="1500"))
    await remote(fake, sleeps=sleeps).chat("provider-a", REQUEST, "r")
    assert sleeps.delays == [1.5]


async def test_429_beyond_the_cap_is_not_waited_for(fake):
    sleeps = Sleeps()
    fake.enqueue(Fault(status=429, retry_after="120"))
    result = await remote(fake, sleeps=sleeps).chat("provider-a", REQUEST, "r")
    assert result["hop"] == "429" and result["headers"]["retry-after"] == "120"
    assert sleeps.delays == [] and fake.calls == 1


async def test_400_is_not_retried_and_does_not_fall_back(fake):
    fake.enqueue(Fault(status=400))
    result = await remote(fake).chat("provider-a", REQUEST, "r")
    assert result["status"] == 400 and result["code"] == "upstream_bad_request"
    assert fake.calls == 1


@pytest.mark.parametrize("garbage", ["<html>gateway error</html>", '{"object": "list"}',
                                     "[1, 2]"])
async def test_a_200_that_is_not_a_completion_is_a_server_failure(fake, garbage):
    """The body is read raw (no SDK model): what is not a chat completion is the
    provider's failure (retried, then a payload the fallback walker hops on)."""
    fake.set_default(Fault(garbage=garbage))
    result = await remote(fake).chat("provider-a", REQUEST, "req-g")
    assert result["__error__"] and result["hop"] == "server"


async def test_connection_drop_is_a_connect_error(fake):
    fake.set_default(Fault(drop=True))
    result = await remote(fake).chat("provider-a", REQUEST, "r")
    assert result["hop"] == "connect" and result["status"] == 503
    assert fake.calls == 2


async def test_connection_refused():
    port = free_port()  # nothing listens there
    settings = RouterSettings.model_validate({
        "providers": [{"name": "gone", "base_url": f"http://127.0.0.1:{port}/v1", "model": "m",
                       "retry": {"max_retries": 0}}],
        "tiers": {"medium": ["gone"], "large": ["gone"], "small": ["local"]}})
    result = await RemoteProviders(settings, environ={}).chat("gone", REQUEST, "r")
    assert result["hop"] == "connect"


async def test_latency_beyond_the_timeout_is_a_timeout(fake):
    fake.set_default(Fault(latency_s=2.0))
    result = await remote(fake, timeout_s=0.3, retry={"max_retries": 0}).chat(
        "provider-a", REQUEST, "r")
    assert result["hop"] == "timeout" and result["status"] == 504


async def test_latency_within_the_timeout_is_fine(fake):
    fake.enqueue(Fault(latency_s=0.2))
    result = await remote(fake).chat("provider-a", REQUEST, "r")
    assert result["object"] == "chat.completion"


async def test_stream_drop_before_any_token_is_retried(fake):
    sleeps = Sleeps()
    fake.enqueue(Fault(drop_after_chunks=1))  # only the role chunk got through
    chunks = [c async for c in remote(fake, sleeps=sleeps).chat_stream("provider-a", REQUEST, "r")]
    assert text_of(chunks) == fake.reply and fake.calls == 2
    assert sum(1 for c in chunks if c.get("choices") and c["choices"][0]["delta"].get("role")) == 1


async def test_stream_drop_after_tokens_ends_with_an_error_payload(fake):
    fake.set_default(Fault(drop_after_chunks=3))
    chunks = [c async for c in remote(fake).chat_stream("provider-a", REQUEST, "r")]
    assert text_of(chunks[:-1]) == "Hello from"
    assert chunks[-1]["__error__"] and chunks[-1]["code"] == "upstream_stream_failed"
    assert chunks[-1]["status"] == 502
    assert not any(c.get("choices") and c["choices"][0].get("finish_reason") for c in chunks[:-1])
    assert fake.calls == 1  # never retried once tokens were sent


async def test_stream_slow_chunks_time_out(fake):
    fake.set_default(Fault(chunk_delay_s=1.0, drop_after_chunks=None))
    chunks = [c async for c in remote(fake, timeout_s=0.3, retry={"max_retries": 0})
              .chat_stream("provider-a", REQUEST, "r")]
    assert chunks[-1]["__error__"] and chunks[-1]["hop"] == "timeout"


async def test_stream_status_error_before_start(fake):
    fake.set_default(Fault(status=502))
    chunks = [c async for c in remote(fake).chat_stream("provider-a", REQUEST, "r")]
    assert len(chunks) == 1 and chunks[0]["hop"] == "502"


# ----------------------------------------------------------------------------- breaker
async def test_breaker_opens_then_recovers_through_a_probe(fake):
    clock = Clock()
    providers = remote(fake, clock=clock, retry={"max_retries": 0})
    fake.set_default(Fault(status=500))
    for _ in range(2):
        assert (await providers.chat("provider-a", REQUEST, "r"))["hop"] == "500"
    assert providers.status()["provider-a"]["state"] == "open"
    refused = await providers.chat("provider-a", REQUEST, "r")
    assert refused["code"] == "circuit_open" and refused["hop"] == "circuit_open"
    assert fake.calls == 2  # the open breaker did not call the provider
    fake.set_default(None)
    clock.now += 31
    assert providers.status()["provider-a"]["state"] == "half_open"
    assert (await providers.chat("provider-a", REQUEST, "r"))["object"] == "chat.completion"
    assert providers.status()["provider-a"]["state"] == "closed"


async def test_breaker_counts_each_failed_attempt_and_stops_retrying_when_open(fake):
    providers = remote(fake, retry={"max_retries": 5})
    fake.set_default(Fault(status=503))
    result = await providers.chat("provider-a", REQUEST, "r")
    assert result["hop"] == "503"
    assert fake.calls == 2  # threshold 2: the breaker opened and stopped the retries
    assert providers.status()["provider-a"]["state"] == "open"


async def test_bad_requests_do_not_trip_the_breaker(fake):
    providers = remote(fake, retry={"max_retries": 0})
    fake.set_default(Fault(status=400))
    for _ in range(3):
        await providers.chat("provider-a", REQUEST, "r")
    assert providers.status()["provider-a"]["state"] == "closed"


# ----------------------------------------------------------------------------- chain
def chain_over(providers: RemoteProviders, *names: str) -> FallbackChain:
    def target(name: str) -> Target:
        return Target(name,
                      lambda request, rid, n=name: providers.chat(n, request, rid),
                      lambda request, rid, n=name: providers.chat_stream(n, request, rid))
    return FallbackChain([target(n) for n in names], label="tier large")


@pytest.mark.parametrize("fault,hop", [
    (Fault(status=500), "500"), (Fault(status=429, retry_after="1"), "429"),
    (Fault(drop=True), "connect"), (Fault(latency_s=2), "timeout"),
])
async def test_each_fault_falls_back_to_the_next_provider(fake, fake_b, fault, hop):
    providers = remote(fake, fake_b, timeout_s=0.5, retry={"max_retries": 0})
    fake.set_default(fault)
    outcome = await chain_over(providers, "provider-a", "provider-b").complete(REQUEST, "r")
    assert outcome.target.name == "provider-b"
    assert outcome.body["choices"][0]["message"]["content"] == "Provider b answers."
    assert outcome.fallback_header == f"provider-a:{hop}>provider-b"


async def test_stream_falls_back_before_first_token(fake, fake_b):
    providers = remote(fake, fake_b, retry={"max_retries": 0})
    fake.set_default(Fault(drop_after_chunks=1))
    outcome = await chain_over(providers, "provider-a", "provider-b").stream(REQUEST, "r")
    chunks = [c async for c in outcome.chunks]
    assert outcome.fallback_header == "provider-a:connect>provider-b"
    assert text_of(chunks) == "Provider b answers."


async def test_open_breaker_is_skipped_quickly(fake, fake_b):
    providers = remote(fake, fake_b, retry={"max_retries": 0})
    fake.set_default(Fault(status=503))
    chain = chain_over(providers, "provider-a", "provider-b")
    await chain.complete(REQUEST, "r1")
    await chain.complete(REQUEST, "r2")
    outcome = await chain.complete(REQUEST, "r3")
    assert outcome.fallback_header == "provider-a:circuit_open>provider-b"
    assert fake.calls == 2


async def test_whole_chain_down(fake, fake_b):
    from serve_app.errors import ApiError

    providers = remote(fake, fake_b, retry={"max_retries": 0})
    fake.set_default(Fault(status=500))
    fake_b.set_default(Fault(drop=True))
    with pytest.raises(ApiError) as caught:
        await chain_over(providers, "provider-a", "provider-b").complete(REQUEST, "r")
    assert caught.value.status == 503
    assert caught.value.headers["x-fallback"] == "provider-a:500>provider-b:connect"


# ----------------------------------------------------------------------------- client
def test_provider_request_filters_and_sets_stream_options():
    params = provider_request({**REQUEST, "stream": True, "ignore_eos": True,
                               "stream_options": {"include_usage": False}}, "gpt-x", stream=True)
    assert params["model"] == "gpt-x" and params["stream"] is True
    assert params["stream_options"] == {"include_usage": True}
    assert "ignore_eos" not in params and "min_tokens" not in params


async def test_client_raises_upstream_errors(fake):
    client = ProviderClient(settings_for(fake).providers[0], environ={})
    fake.enqueue(Fault(status=404))
    with pytest.raises(UpstreamError) as caught:
        await client.complete(REQUEST, "r")
    assert caught.value.kind == "not_found" and caught.value.fallback
    await client.aclose()


async def test_admin_endpoint_controls_faults(fake):
    import httpx

    async with httpx.AsyncClient(base_url=fake.base_url.removesuffix("/v1")) as http:
        response = await http.post("/_admin/enqueue", json={"faults": [{"status": 503}]})
        assert response.status_code == 200 and response.json()["queued"][0]["status"] == 503
        bad = await http.post("/_admin/default", json={"nonsense": 1})
        assert bad.status_code == 400
        result = await remote(fake, retry={"max_retries": 0}).chat("provider-a", REQUEST, "r")
        assert result["hop"] == "503"
        stats = (await http.get("/_admin/stats")).json()
        assert stats["calls"] == 1
        await http.post("/_admin/reset")
        assert fake.calls == 0
