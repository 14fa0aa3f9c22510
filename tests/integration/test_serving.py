"""The serving foundation through HTTP with the openai SDK: real Ray Serve, real vLLM."""
from __future__ import annotations

import asyncio
import json
import math
import os
import time

import httpx
import psutil
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.support.keys import create_key

MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("serving")
    # The cache would answer repeated greedy questions itself; test_cache.py covers it.
    cluster.deploy_stack(data_dir, {"gateway": {"max_body_bytes": 200_000},
                                    "cache": {"enabled": False}})
    cluster.data_dir = data_dir
    cluster.api_key = create_key(cluster.base_url, tenant="serving")["key"]
    return cluster


@pytest.fixture(scope="module")
def client(stack) -> OpenAI:
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0,
                  timeout=120)


@pytest.fixture(scope="module")
def http(stack) -> httpx.Client:
    with httpx.Client(base_url=stack.base_url, timeout=120,
                      headers={"authorization": f"Bearer {stack.api_key}"}) as session:
        yield session


def assert_still_serving(client: OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4,
                                           temperature=0)
    assert reply.choices[0].message.content


# ---------------------------------------------------------------------------- happy paths
def test_models_list(client):
    ids = {model.id for model in client.models.list()}
    assert {MODEL, EMBEDDING_MODEL} <= ids


def test_chat_completion(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=32)
    reply = raw.parse()
    assert raw.headers["x-request-id"]
    assert raw.headers["x-model"] == MODEL
    assert "paris" in reply.choices[0].message.content.lower()
    assert reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 10
    assert 0 < usage.completion_tokens <= 32
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stream_concatenates_to_the_greedy_answer(client):
    params = dict(model=MODEL, temperature=0, seed=7, max_tokens=48,
                  messages=[{"role": "user", "content": "Name three colours of the rainbow."}])
    whole = client.chat.completions.create(**params)
    chunks = list(client.chat.completions.create(
        **params, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == whole.choices[0].finish_reason


def test_stream_without_usage_option_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION,
                                                 max_tokens=8, stream=True))
    assert chunks and all(c.usage is None for c in chunks)


def test_sampling_parameters_reach_the_engine(client):
    short = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 3
    assert short.choices[0].finish_reason == "length"

    counting = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    free = client.chat.completions.create(model=MODEL, messages=counting, temperature=0,
                                          max_tokens=40)
    assert "5" in free.choices[0].message.content
    stopped = client.chat.completions.create(model=MODEL, messages=counting, temperature=0,
                                             max_tokens=40, stop=["5"])
    assert "5" not in stopped.choices[0].message.content
    assert stopped.choices[0].finish_reason == "stop"

    story = [{"role": "user", "content": "Write one sentence about a cat."}]
    first = client.chat.completions.create(model=MODEL, messages=story, temperature=1.0,
                                           seed=1234, max_tokens=24)
    again = client.chat.completions.create(model=MODEL, messages=story, temperature=1.0,
                                           seed=1234, max_tokens=24)
    assert first.choices[0].message.content == again.choices[0].message.content


def test_embeddings_are_unit_vectors_in_input_order(client):
    texts = ["The cat sat on the mat.", "Quarterly revenue grew 4%.", "A kitten on a rug."]
    result = client.embeddings.create(model=EMBEDDING_MODEL, input=texts)
    vectors = [item.embedding for item in result.data]
    assert [item.index for item in result.data] == [0, 1, 2]
    assert all(len(v) == 384 for v in vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vectors)
    single = client.embeddings.create(model=EMBEDDING_MODEL, input=texts[1]).data[0].embedding
    assert max(abs(a - b) for a, b in zip(single, vectors[1])) < 1e-4

    def cosine(a, b):
        return sum(x * y for x, y in zip(a, b))

    assert cosine(vectors[0], vectors[2]) > cosine(vectors[0], vectors[1])
    assert result.usage.prompt_tokens > 0


def test_health_and_readiness(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model"] == MODEL


# ---------------------------------------------------------------------------- errors
def _post(http: httpx.Client, path: str, body: bytes | dict) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(path, content=content, headers={"content-type": "application/json"})


ERROR_CASES = [
    # (name, path, body, status, code, param)
    ("malformed_json", "/v1/chat/completions", b'{"model": "x", "messages": [', 400,
     "invalid_json", None),
    ("missing_messages", "/v1/chat/completions", {"model": MODEL}, 422, "invalid_value",
     "messages"),
    ("bad_role", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 422,
     "invalid_value", "messages[0].role"),
    ("temperature_out_of_range", "/v1/chat/completions",
     {"model": MODEL, "messages": QUESTION, "temperature": 5}, 422, "invalid_value",
     "temperature"),
    ("unknown_model", "/v1/chat/completions", {"model": "gpt-9", "messages": QUESTION}, 404,
     "model_not_found", "model"),
    ("n_greater_than_one", "/v1/chat/completions",
     {"model": MODEL, "messages": QUESTION, "n": 2}, 400, "unsupported_parameter", "n"),
    ("prompt_longer_than_context", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "word " * 4000}]}, 400,
     "context_length_exceeded", "messages"),
    ("max_tokens_past_context", "/v1/chat/completions",
     {"model": MODEL, "messages": QUESTION, "max_tokens": 100_000}, 400,
     "context_length_exceeded", "max_tokens"),
    ("body_too_large", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x" * 300_000}]}, 413,
     "request_too_large", None),
    ("unknown_embedding_model", "/v1/embeddings", {"model": "ada", "input": "x"}, 404,
     "model_not_found", "model"),
    ("empty_embedding_input", "/v1/embeddings", {"model": EMBEDDING_MODEL, "input": []}, 400,
     None, "input"),
    ("streamed_prompt_too_long", "/v1/chat/completions",
     {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "word " * 4000}]},
     400, "context_length_exceeded", "messages"),
]


@pytest.mark.parametrize("name,path,body,status,code,param", ERROR_CASES,
                         ids=[case[0] for case in ERROR_CASES])
def test_error_cases_are_openai_shaped_and_service_survives(http, client, name, path, body,
                                                            status, code, param):
    response = _post(http, path, body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert response.headers["x-request-id"]
    assert_still_serving(client)


def test_sdk_raises_typed_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=QUESTION)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10**6)
    assert caught.value.code == "context_length_exceeded"


# ---------------------------------------------------------------------------- offline default
@pytest.mark.skipif(bool(os.environ.get("OPENAI_API_KEY")), reason="a provider key is set")
@pytest.mark.parametrize("tier", ["medium", "large"])
def test_offline_default_falls_back_to_the_local_model_and_says_so(client, tier):
    raw = client.chat.completions.with_raw_response.create(
        model=tier, messages=QUESTION, max_tokens=4, temperature=0)
    assert raw.headers["x-model"] == MODEL and raw.headers["x-route-tier"] == tier
    hops = raw.headers["x-fallback"].split(">")
    assert hops[-1] == "local" and all(h.endswith(":no_key") for h in hops[:-1])
    auto = client.chat.completions.with_raw_response.create(
        model="auto", messages=QUESTION, max_tokens=4, temperature=0)
    assert auto.headers["x-model"] == MODEL and "x-route-score" in auto.headers


# ---------------------------------------------------------------------------- concurrency
def test_eight_concurrent_requests_all_succeed(stack):
    async def run() -> list:
        async with AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key,
                               max_retries=0, timeout=180) as aclient:
            prompts = [f"Give me one fact about the number {i}." for i in range(8)]
            return await asyncio.gather(*(aclient.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=24,
                temperature=0) for p in prompts))

    replies = asyncio.run(run())
    assert len(replies) == 8
    assert all(r.choices[0].message.content and r.usage.completion_tokens > 0 for r in replies)


# ---------------------------------------------------------------------------- request ids and logs
def test_request_id_is_echoed_and_logged(stack, http):
    request_id = f"test-{time.time_ns()}"
    response = http.post("/v1/chat/completions", headers={"x-request-id": request_id},
                         json={"model": MODEL, "messages": QUESTION, "max_tokens": 4})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == request_id  # the caller's, for correlation
    server_id = response.headers["x-llmstack-request-id"]  # ours: the row's key
    assert server_id and server_id != request_id
    log_file = stack.data_dir / "logs" / "requests.jsonl"
    deadline = time.monotonic() + 10
    record = None
    while time.monotonic() < deadline and record is None:
        if log_file.exists():
            for line in log_file.read_text().splitlines():
                entry = json.loads(line)
                if entry.get("client_request_id") == request_id:
                    record = entry
        time.sleep(0.2)
    assert record is not None and record["request_id"] == server_id
    assert record["status"] == 200 and record["model"] == MODEL
    assert record["tokens_in"] > 0 and record["tokens_out"] > 0
    assert record["route"] == "/v1/chat/completions" and record["latency_ms"] > 0
    assert record["tenant"] == "serving" and record["key_id"]


# ---------------------------------------------------------------------------- client disconnect
def _running_requests() -> int:
    from ray import serve

    return serve.get_deployment_handle("LocalLLM", "models").running_requests.remote().result()


def test_client_disconnect_aborts_generation(stack):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 1500, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=stack.base_url, timeout=60,
                      headers={"authorization": f"Bearer {stack.api_key}"}) as session:
        with session.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in received)
            assert _running_requests() == 1
    # 1500 tokens take over a minute on CPU; an abort frees the engine at once.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _running_requests() != 0:
        time.sleep(0.2)
    assert _running_requests() == 0


# ---------------------------------------------------------------------------- metrics
def test_metrics_reach_the_prometheus_endpoint(stack, client):
    import ray

    client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
    node = ray.nodes()[0]
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    wanted = ["llmstack_requests_total", "llmstack_request_latency_seconds_bucket",
              "llmstack_tokens_total"]
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(url, timeout=10).text
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    for name in wanted:
        assert name in text, name
    assert 'route="/v1/chat/completions"' in text


# ---------------------------------------------------------------------------- engine failure (last)
def test_engine_failure_is_503_then_the_replica_recovers(stack, client, http):
    # Only the engines of this test's Ray cluster (descendants of this process).
    engines = [p for p in psutil.Process().children(recursive=True)
               if "EngineCore" in p.name() or any("EngineCore" in a for a in p.cmdline())]
    assert engines, "no vLLM EngineCore process found"
    for process in engines:  # the whole engine tree, as a crash would take it
        for child in process.children(recursive=True):
            child.kill()
        process.kill()
    time.sleep(1)
    response = http.post("/v1/chat/completions",
                         json={"model": MODEL, "messages": QUESTION, "max_tokens": 4})
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    # The local model is the only target of its explicit chain: the chain reports it.
    assert error["code"] == "all_targets_failed" and "local (503)" in error["message"]
    assert response.headers["x-fallback"] == "local:503"
    assert "Traceback" not in error["message"]
    # Serve's health check replaces the replica; the service comes back on its own.
    stack.wait_ready(timeout_s=600)
    assert_still_serving(client)
