"""Semantic cache through HTTP with the real embedding model and LanceDB."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.support.keys import admin_client, create_key

MODEL = "smollm2-135m-instruct"
PRICE = {"input_per_mtok": 1000.0, "output_per_mtok": 2000.0}
MAX_ENTRIES = 200


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("cache")
    args = {"cache": {"flush_interval_s": 0.2, "max_entries": MAX_ENTRIES,
                      "evict_to_fraction": 0.5},
            "router": {"local": {"price_in_per_mtok": PRICE["input_per_mtok"],
                                 "price_out_per_mtok": PRICE["output_per_mtok"]}}}
    cluster.deploy_stack(data_dir, args)
    cluster.data_dir = data_dir
    cluster.stack_args = args
    cluster.keys = {tenant: create_key(cluster.base_url, tenant=tenant)
                    for tenant in ("alpha", "beta")}
    return cluster


def http_for(stack, tenant: str = "alpha") -> httpx.Client:
    key = stack.keys[tenant]["key"]
    return httpx.Client(base_url=stack.base_url, timeout=120,
                        headers={"authorization": f"Bearer {key}"})


def ask(stack, question: str, *, tenant: str = "alpha", headers: dict | None = None,
        **extra) -> httpx.Response:
    body = {"model": MODEL, "temperature": 0, "max_tokens": 12,
            "messages": [{"role": "user", "content": question}], **extra}
    with http_for(stack, tenant) as http:
        response = http.post("/v1/chat/completions", json=body, headers=headers or {})
    assert response.status_code == 200, response.text
    return response


def test_paraphrase_hits_with_zero_usage_and_the_ledger_records_the_saving(stack):
    first = ask(stack, "How do I reverse a list in Python?")
    assert first.headers["x-cache"] == "miss"
    again = ask(stack, "What is the way to reverse a Python list?")
    assert again.headers["x-cache"] == "hit", again.headers
    assert float(again.headers["x-cache-similarity"]) >= 0.925
    assert again.json()["choices"][0]["message"]["content"] == \
        first.json()["choices"][0]["message"]["content"]
    assert again.json()["usage"] == {"prompt_tokens": 0, "completion_tokens": 0,
                                     "total_tokens": 0}
    assert again.headers["x-model"] == MODEL
    with admin_client(stack.base_url) as admin:
        row = admin.get(f"/admin/v1/usage/requests/{again.headers['x-llmstack-request-id']}").json()
    usage = first.json()["usage"]
    expected = (usage["prompt_tokens"] * PRICE["input_per_mtok"]
                + usage["completion_tokens"] * PRICE["output_per_mtok"]) / 1e6
    assert row["cache_hit"] is True and row["cost_usd"] == 0
    assert row["saved_usd"] == pytest.approx(expected)


def test_non_paraphrases_miss(stack):
    ask(stack, "Is Python faster than Java?")
    assert ask(stack, "How do I sort a list in Python?").headers["x-cache"] == "miss"
    reversed_question = ask(stack, "Is Java faster than Python?")
    assert reversed_question.headers["x-cache"] == "miss"  # similar, but the guard refuses


def test_exact_repeat_hits_and_streams_from_the_cache(stack):
    ask(stack, "What is the capital of France?")
    with http_for(stack) as http:
        with http.stream("POST", "/v1/chat/completions", json={
                "model": MODEL, "temperature": 0, "max_tokens": 12, "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "Which city is the capital of France?"}]
        }) as response:
            assert response.headers["x-cache"] == "hit"
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    client = OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.keys["alpha"]["key"])
    chunks = list(client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "What is the capital of France?"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.total_tokens == 0


def test_streamed_answers_are_stored(stack):
    client = OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.keys["alpha"]["key"])
    question = [{"role": "user", "content": "Name a primary colour."}]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=12, stream=True, messages=question) if c.choices)
    time.sleep(0.5)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, temperature=0, max_tokens=12, messages=question)
    assert raw.headers["x-cache"] == "hit"
    assert raw.parse().choices[0].message.content == streamed


def test_sdk_defaults_without_a_temperature_are_served_from_the_cache(stack):
    """The OpenAI SDK sends no temperature unless told: FAQ clients on its defaults hit."""
    client = OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.keys["alpha"]["key"])
    question = [{"role": "user", "content": "How do I reset my password?"}]
    first = client.chat.completions.with_raw_response.create(
        model=MODEL, max_tokens=12, messages=question)
    assert first.headers["x-cache"] == "miss"
    time.sleep(0.5)
    again = client.chat.completions.with_raw_response.create(
        model=MODEL, max_tokens=12, messages=question)
    assert again.headers["x-cache"] == "hit"
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content


def test_tenants_never_share_answers(stack):
    ask(stack, "What does a tenant-isolated cache mean?", tenant="alpha")
    assert ask(stack, "What does a tenant-isolated cache mean?",
               tenant="alpha").headers["x-cache"] == "hit"
    assert ask(stack, "What does a tenant-isolated cache mean?",
               tenant="beta").headers["x-cache"] == "miss"


def test_sampled_requests_system_prompt_and_parameters_scope_the_cache(stack):
    ask(stack, "Give me a fruit.")
    sampled = ask(stack, "Give me a fruit.", temperature=0.9)
    assert sampled.headers["x-cache"] == "bypass"
    other_system = ask(stack, "Give me a fruit.", messages=[
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Give me a fruit."}])
    assert other_system.headers["x-cache"] == "miss"
    assert ask(stack, "Give me a fruit.", max_tokens=5).headers["x-cache"] == "miss"


def test_no_cache_no_store_and_cache_control(stack):
    ask(stack, "Tell me about owls.")
    assert ask(stack, "Tell me about owls.",
               cache={"no_cache": True}).headers["x-cache"] == "bypass"
    assert ask(stack, "Tell me about owls.",
               headers={"cache-control": "no-cache"}).headers["x-cache"] == "bypass"
    ask(stack, "Tell me about hedgehogs.", cache={"no_store": True})
    time.sleep(0.5)
    assert ask(stack, "Tell me about hedgehogs.").headers["x-cache"] == "miss"
    bad = http_for(stack).post("/v1/chat/completions", json={
        "model": MODEL, "temperature": 0, "messages": [{"role": "user", "content": "x"}],
        "cache": {"ttl": -1}})
    assert bad.status_code == 422 and bad.json()["error"]["param"].startswith("cache")


def test_ttl_expiry(stack):
    ask(stack, "What colour is the sky?", cache={"ttl": 1.5})
    assert ask(stack, "What colour is the sky?").headers["x-cache"] == "hit"
    time.sleep(2.0)
    assert ask(stack, "What colour is the sky?").headers["x-cache"] == "miss"


def _invalidate(stack, **body) -> int:
    with admin_client(stack.base_url) as admin:
        response = admin.post("/admin/v1/cache/invalidate", json=body)
    assert response.status_code == 200, response.text
    return response.json()["deleted"]


def test_invalidation_by_id_tenant_model_and_all(stack):
    ask(stack, "Where do penguins live?")
    hit = ask(stack, "Where do penguins live?")
    assert _invalidate(stack, kind="id", value=hit.headers["x-cache-entry"]) == 1
    assert ask(stack, "Where do penguins live?").headers["x-cache"] == "miss"

    ask(stack, "Why is the ocean salty?", tenant="beta")
    assert _invalidate(stack, kind="tenant", value="beta") >= 1
    assert ask(stack, "Why is the ocean salty?", tenant="beta").headers["x-cache"] == "miss"

    assert _invalidate(stack, kind="model", value=MODEL, tenant="beta") >= 1
    assert ask(stack, "Why is the ocean salty?", tenant="beta").headers["x-cache"] == "miss"

    with admin_client(stack.base_url) as admin:
        bad = admin.post("/admin/v1/cache/invalidate", json={"kind": "colour"})
        assert bad.status_code == 422
        assert admin.post("/admin/v1/cache/invalidate", json={"kind": "all"}).status_code == 200
        assert admin.get("/admin/v1/cache/stats").json()["entries"] == 0


def test_invalidation_by_source_document(stack):
    from ray import serve

    # Entries built from retrieved chunks carry their source ids (the RAG path sets them);
    # here one is stored directly through the cache deployment's own API.
    cache = serve.get_deployment_handle("SemanticCache", "stack")
    from serve_app.cache.config import CacheSettings
    from serve_app.cache.policy import plan_cache

    body = {"model": MODEL, "temperature": 0, "max_tokens": 12,
            "messages": [{"role": "user", "content": "Summarise the travel policy."}]}
    from serve_app.protocol import ChatCompletionRequest

    # The gateway plans with the validated request, defaults filled in.
    decision = plan_cache(ChatCompletionRequest.model_validate(body).model_dump(), {},
                          CacheSettings())
    completion = {"id": "x", "object": "chat.completion", "created": 0, "model": MODEL,
                  "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": "Book early."}}],
                  "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    vector = serve.get_deployment_handle("Embedder", "models").embed.remote(
        [decision.query_text]).result()[0]
    stored = cache.store.remote("alpha", decision.to_dict(), vector, completion,
                                ["doc:alpha/handbook/travel@3"], None).result()
    assert stored["stored"] is True
    assert ask(stack, "Summarise the travel policy.").headers["x-cache"] == "hit"
    assert _invalidate(stack, kind="source", value="doc:alpha/handbook/travel") == 1
    assert ask(stack, "Summarise the travel policy.").headers["x-cache"] == "miss"


def test_a_cached_answer_reported_wrong_is_gone_and_the_next_request_misses(stack):
    ask(stack, "What is the capital of Germany?")
    time.sleep(0.5)
    paraphrase = "Which city is the capital of Germany?"
    hit = ask(stack, paraphrase)
    assert hit.headers["x-cache"] == "hit", dict(hit.headers)
    request_id, entry_id = hit.headers["x-llmstack-request-id"], hit.headers["x-cache-entry"]
    with http_for(stack, "beta") as beta:
        foreign = beta.post("/v1/cache/feedback", json={"request_id": request_id})
    assert foreign.status_code == 403, foreign.text
    assert foreign.json()["error"]["type"] == "permission_error"
    with http_for(stack) as alpha:
        unknown = alpha.post("/v1/cache/feedback", json={"request_id": "0" * 32})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == \
            "cache_hit_not_found"
        report = alpha.post("/v1/cache/feedback",
                            json={"request_id": request_id, "reason": "wrong capital"})
        assert report.status_code == 200, report.text
        assert report.json()["removed"] is True and report.json()["entry_id"] == entry_id
        summary = alpha.get("/v1/cache/feedback").json()
    assert sum(row["negatives"] for row in summary["data"]) >= 1
    assert _invalidate(stack, kind="id", value=entry_id) == 0  # gone from the table
    again = ask(stack, paraphrase)
    assert again.headers["x-cache"] == "miss", dict(again.headers)


def test_concurrent_lookups_and_inserts_lose_nothing(stack):
    questions = [f"What is {i} plus {i}?" for i in range(50)]

    async def run() -> list[httpx.Response]:
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=300, headers={
                "authorization": f"Bearer {stack.keys['alpha']['key']}"}) as client:
            async def one(question: str) -> httpx.Response:
                async with limit:
                    return await client.post("/v1/chat/completions", json={
                        "model": MODEL, "temperature": 0, "max_tokens": 6,
                        "messages": [{"role": "user", "content": question}]})
            return await asyncio.gather(*(one(q) for q in questions + questions))

    responses = asyncio.run(run())
    assert len(responses) == 100 and all(r.status_code == 200 for r in responses)
    time.sleep(0.6)
    with admin_client(stack.base_url) as admin:
        admin.post("/admin/v1/cache/maintain").raise_for_status()
    for question in questions:  # every distinct answer was stored
        response = ask(stack, question, max_tokens=6)
        assert response.headers["x-cache"] == "hit", (question, dict(response.headers),
                                                       response.json())


def test_cache_survives_a_restart_of_the_stack(stack):
    ask(stack, "What is the boiling point of water?")
    time.sleep(0.5)
    args = {**stack.stack_args, "cache": {**stack.stack_args["cache"],
                                          "maintenance_interval_s": 31}}
    stack.deploy_stack(stack.data_dir, args)  # new replicas reopen the same table
    assert ask(stack, "What is the boiling point of water?").headers["x-cache"] == "hit"


def test_size_cap_evicts_least_recently_hit(stack):
    with admin_client(stack.base_url) as admin:
        admin.post("/admin/v1/cache/invalidate", json={"kind": "all"}).raise_for_status()
    keeper = "Which animal is the largest mammal?"
    ask(stack, keeper)
    fillers = [f"Tell me a fact about city number {i}." for i in range(MAX_ENTRIES + 10)]

    async def fill() -> None:
        limit = asyncio.Semaphore(16)
        async with AsyncOpenAI(base_url=f"{stack.base_url}/v1", timeout=300, max_retries=0,
                               api_key=stack.keys["alpha"]["key"]) as client:
            async def one(question: str) -> None:
                async with limit:
                    await client.chat.completions.create(
                        model=MODEL, temperature=0, max_tokens=1,
                        messages=[{"role": "user", "content": question}])
            await asyncio.gather(*(one(q) for q in fillers))

    asyncio.run(fill())
    assert ask(stack, keeper).headers["x-cache"] == "hit"  # recently hit
    time.sleep(0.5)
    with admin_client(stack.base_url) as admin:
        result = admin.post("/admin/v1/cache/maintain").json()
        stats = admin.get("/admin/v1/cache/stats").json()
    assert result["evicted"] > 0
    assert stats["entries"] <= MAX_ENTRIES
    assert ask(stack, keeper).headers["x-cache"] == "hit"
    assert ask(stack, fillers[0]).headers["x-cache"] == "miss"  # least recently used went
