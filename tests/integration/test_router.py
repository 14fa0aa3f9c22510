"""Router through HTTP: classifier routing, aliases, explicit bypass, every provider fault
and its fallback, the circuit breaker, a whole chain down, mid-stream failure, cost for the
target that answered, offline default. Providers are real HTTP servers (tests/support)."""
from __future__ import annotations

import time

import httpx
import openai
import pytest
from openai import OpenAI

from tests.support.fake_provider import FakeProvider, Fault
from tests.support.keys import admin_client, create_key

LOCAL = "smollm2-135m-instruct"
MINI, FRONTIER = "mini-model", "frontier-model"
EASY = "What color is the sky on a clear day?"
HARD = ("Find all real solutions of x^4 - 5x^2 + 4 = 0 and determine the Galois group of "
        "the splitting field of x^4-2 over Q.")
MINI_PRICE = (1000.0, 2000.0)  # USD per million tokens in / out (visible in the ledger)


@pytest.fixture(scope="module")
def providers():
    with FakeProvider(name="fake-mini") as mini, \
            FakeProvider(name="fake-frontier") as frontier, \
            FakeProvider(name="fake-flaky") as flaky:
        yield {"mini": mini, "frontier": frontier, "flaky": flaky}


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory, providers):
    data_dir = tmp_path_factory.mktemp("router")
    # Breakers stay shut for the fault tests (failures add up across tests); the breaker
    # test has its own provider with a low threshold.
    fast = {"timeout_s": 2.0, "connect_timeout_s": 1.0,
            "retry": {"max_retries": 1, "backoff_base_s": 0.05, "backoff_max_s": 0.1,
                      "retry_after_cap_s": 1.0},
            "circuit_breaker": {"failure_threshold": 1000, "reset_s": 3.0}}
    flaky = {**fast, "retry": {**fast["retry"], "max_retries": 0},
             "circuit_breaker": {"failure_threshold": 3, "reset_s": 3.0}}
    cluster.deploy_stack(data_dir, {
        "cache": {"enabled": False},
        "router": {
            # Each fault test expects the configured chain order (no local preference).
            "local": {"prefer_after_refusal_s": 0},
            "providers": [
                {"name": "fake-mini", "base_url": providers["mini"].base_url, "model": MINI,
                 "price_in_per_mtok": MINI_PRICE[0], "price_out_per_mtok": MINI_PRICE[1],
                 **fast},
                {"name": "fake-frontier", "base_url": providers["frontier"].base_url,
                 "model": FRONTIER, "price_in_per_mtok": 5000.0,
                 "price_out_per_mtok": 9000.0, **fast},
                {"name": "fake-flaky", "base_url": providers["flaky"].base_url,
                 "model": "flaky-model", **flaky},
                {"name": "keyless", "base_url": "https://api.example.invalid/v1",
                 "model": "keyless-model", "api_key_env": "LLMSTACK_TEST_UNSET_KEY"}],
            "tiers": {"small": ["local", "fake-mini"],
                      "medium": ["fake-mini", "fake-frontier", "local"],
                      "large": ["fake-frontier", "fake-mini", "local"]},
            "policy": {"thresholds": {"small_below": 0.1, "large_from": 0.5}}}},
        # Providers are called in-process, so each Gateway replica has its own breakers:
        # one replica makes "open after 3 failures" exact (autoscaling could add one).
        deployments={"Gateway": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}})
    cluster.key = create_key(cluster.base_url, tenant="routing")["key"]
    return cluster


@pytest.fixture(autouse=True)
def healthy(providers):
    for fake in providers.values():
        fake.reset()
    yield


def chat(stack, content: str, model: str = "auto", **extra) -> httpx.Response:
    with httpx.Client(base_url=stack.base_url, timeout=120,
                      headers={"authorization": f"Bearer {stack.key}"}) as http:
        return http.post("/v1/chat/completions", json={
            "model": model, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": content}], **extra})


def test_classifier_sends_easy_to_small_and_hard_to_large(stack):
    easy = chat(stack, EASY)
    assert easy.status_code == 200, easy.text
    assert easy.headers["x-route-tier"] == "small" and easy.headers["x-model"] == LOCAL
    assert float(easy.headers["x-route-score"]) < 0.1
    hard = chat(stack, HARD)
    assert hard.headers["x-route-tier"] == "large" and hard.headers["x-model"] == FRONTIER
    assert float(hard.headers["x-route-score"]) >= 0.5
    assert "x-fallback" not in hard.headers


def test_aliases_and_explicit_models_bypass_the_classifier(stack, providers):
    medium = chat(stack, HARD, model="medium")
    assert medium.headers["x-route-tier"] == "medium" and medium.headers["x-model"] == MINI
    assert "x-route-score" not in medium.headers
    explicit = chat(stack, EASY, model=FRONTIER)
    assert explicit.headers["x-model"] == FRONTIER and "x-route-tier" not in explicit.headers
    assert providers["frontier"].requests[-1]["model"] == FRONTIER
    assert "cache" not in providers["frontier"].requests[-1]  # gateway fields stay here
    with httpx.Client(base_url=stack.base_url, timeout=60,
                      headers={"authorization": f"Bearer {stack.key}"}) as http:
        ids = {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert {"auto", "small", "medium", "large", MINI, FRONTIER, LOCAL} <= ids


@pytest.mark.parametrize("fault,reason", [
    (Fault(status=500), "500"),
    (Fault(status=503), "503"),
    (Fault(status=429, retry_after="0"), "429"),
    (Fault(latency_s=4.0), "timeout"),
    (Fault(drop=True), "connection"),
], ids=["500", "503", "429", "timeout", "connection-drop"])
def test_each_fault_falls_back_to_the_next_target(stack, providers, fault, reason):
    providers["frontier"].set_default(fault)
    response = chat(stack, HARD, model="large")
    assert response.status_code == 200, response.text
    assert response.headers["x-model"] == MINI
    hops = response.headers["x-fallback"]
    assert hops.startswith("fake-frontier:") and hops.endswith(">fake-mini")
    if reason != "connection":
        assert hops.split(">")[0] == f"fake-frontier:{reason}"
    assert providers["frontier"].calls >= 2  # retried once before falling back


def test_client_errors_do_not_fall_back(stack, providers):
    providers["frontier"].set_default(Fault(status=400))
    response = chat(stack, HARD, model="large")
    assert response.status_code == 400
    assert providers["mini"].calls == 0


def test_stream_that_fails_before_its_first_token_falls_back(stack, providers):
    providers["frontier"].enqueue(Fault(drop=True), Fault(drop=True))
    client = OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="large", stream=True, max_tokens=16,
        messages=[{"role": "user", "content": HARD}])
    assert raw.headers["x-model"] == MINI and "fake-frontier" in raw.headers["x-fallback"]
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert "fake-mini" in text


def test_stream_that_fails_after_tokens_ends_with_an_error_event(stack, providers):
    providers["frontier"].enqueue(Fault(drop_after_chunks=3))
    with httpx.Client(base_url=stack.base_url, timeout=60,
                      headers={"authorization": f"Bearer {stack.key}"}) as http:
        with http.stream("POST", "/v1/chat/completions", json={
                "model": "large", "stream": True, "max_tokens": 16,
                "messages": [{"role": "user", "content": HARD}]}) as response:
            assert response.status_code == 200
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert '"error"' in events[-2] and "upstream_stream_failed" in events[-2]
    assert not any('"finish_reason":"stop"' in e for e in events[:-2])  # no clean finish
    client = OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.key, max_retries=0)
    providers["frontier"].enqueue(Fault(drop_after_chunks=3))
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="large", stream=True, max_tokens=16,
                                                 messages=[{"role": "user", "content": HARD}]):
            pass


def test_circuit_breaker_opens_then_recovers(stack, providers):
    flaky = providers["flaky"]
    flaky.set_default(Fault(status=500))
    hops = [chat(stack, EASY, model="flaky-model").headers["x-fallback"] for _ in range(5)]
    assert hops[:3] == ["fake-flaky:500"] * 3
    assert hops[3:] == ["fake-flaky:circuit_open"] * 2  # open after 3 failures
    assert flaky.calls == 3  # an open breaker sends nothing upstream
    flaky.set_default(None)
    time.sleep(3.5)  # reset_s: one half-open probe goes through and closes the breaker
    recovered = chat(stack, EASY, model="flaky-model")
    assert recovered.status_code == 200 and recovered.headers["x-model"] == "flaky-model"
    assert "x-fallback" not in recovered.headers
    assert chat(stack, EASY, model="flaky-model").status_code == 200


def test_whole_chain_down_is_503_with_a_clear_error(stack, providers):
    providers["frontier"].set_default(Fault(status=502))
    response = chat(stack, EASY, model=FRONTIER)  # explicit: a chain of one
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "all_targets_failed" and "fake-frontier" in error["message"]
    assert response.headers["x-fallback"].startswith("fake-frontier:")


def test_usage_and_cost_are_recorded_for_the_target_that_answered(stack, providers):
    providers["frontier"].set_default(Fault(status=500))
    response = chat(stack, HARD, model="large")
    usage = response.json()["usage"]
    with admin_client(stack.base_url) as admin:
        row = admin.get(f"/admin/v1/usage/requests/{response.headers['x-llmstack-request-id']}").json()
    assert row["model"] == MINI and row["tier"] == "large"
    assert row["fallback"].startswith("fake-frontier:")
    expected = (usage["prompt_tokens"] * MINI_PRICE[0]
                + usage["completion_tokens"] * MINI_PRICE[1]) / 1e6
    assert row["cost_usd"] == pytest.approx(expected)


def test_provider_without_its_key_is_skipped_and_says_so(stack):
    response = chat(stack, EASY, model="keyless-model")
    assert response.status_code == 503
    assert response.headers["x-fallback"] == "keyless:no_key"
    assert response.json()["error"]["code"] == "all_targets_failed"
