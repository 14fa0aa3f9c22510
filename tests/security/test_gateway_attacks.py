"""The gateway under hostile clients, over real HTTP against one deployed stack (real
Serve, vLLM, Quota): hostile request ids (class 1), over-limit bursts counted with the
real tokenizer (3), exceptions and disconnects after admission (4), client errors that
must not look like outages (5), admin updates with invalid values (6), unauthenticated
floods and readiness probes (12), and allowed models on routed requests (13)."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.support.keys import admin_client, create_key

MODEL = "smollm2-135m-instruct"
HI = [{"role": "user", "content": "Say hi."}]
PRICE_PER_TOKEN = 0.0001  # $100 per million tokens: budgets are visible


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("security")
    cluster.deploy_stack(
        data_dir,
        {"quota": {"window_s": 60},
         "router": {"local": {"price_in_per_mtok": PRICE_PER_TOKEN * 1e6,
                              "price_out_per_mtok": PRICE_PER_TOKEN * 1e6}},
         "gateway": {"unauthenticated_per_minute": 40, "readiness_cache_s": 5},
         "cache": {"enabled": False}},
        # One Gateway replica: the per-address gate is per replica, and a burst must not
        # autoscale the gateway in the middle of an exact count.
        deployments={"Gateway": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}})
    cluster.data_dir = data_dir
    return cluster


def http(stack, key: str | None = None, **kwargs) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(base_url=stack.base_url, timeout=180, headers=headers, **kwargs)


def chat_body(**extra):
    return {"model": MODEL, "messages": HI, "max_tokens": 4, "temperature": 0, **extra}


def usage_rows(stack, **query) -> list[dict]:
    with admin_client(stack.base_url) as admin:
        response = admin.get("/admin/v1/usage/requests", params={"limit": 1000, **query})
        response.raise_for_status()
        return response.json()["data"]


def budget(stack, key_id: str) -> dict:
    with admin_client(stack.base_url) as admin:
        return admin.get(f"/admin/v1/keys/{key_id}/budget").json()


def wait_for(condition, timeout_s: float = 30.0, describe=lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not condition():
        time.sleep(0.3)
    assert condition(), describe()


# ---------------------------------------------------------------------------- 1: request ids
def prompt_tokens(stack) -> int:
    """The exact prompt count of HI (what the gateway reserves for the local model)."""
    key = create_key(stack.base_url, tenant="probe")["key"]
    with httpx.Client(base_url=stack.base_url, timeout=120,
                      headers={"authorization": f"Bearer {key}"}) as client:
        reply = client.post("/v1/chat/completions", json=chat_body(max_tokens=1))
    return reply.json()["usage"]["prompt_tokens"]


def test_a_reused_request_id_is_only_a_label(stack):
    # The worst case of one request is (prompt + 4) tokens; the budget covers 3.5 of them.
    worst = (prompt_tokens(stack) + 4) * PRICE_PER_TOKEN
    first = create_key(stack.base_url, tenant="ids-a", budget_usd=round(3.5 * worst, 6),
                       budget_period="day")
    other = create_key(stack.base_url, tenant="ids-b")
    fixed = {"x-request-id": "the-same-id"}

    async def run():
        async with http(stack, first["key"]) as client:
            answers = [await client.post("/v1/chat/completions", json=chat_body(),
                                         headers=fixed) for _ in range(30)]
        async with http(stack, other["key"]) as client:
            theirs = await client.post("/v1/chat/completions", json=chat_body(), headers=fixed)
        return answers, theirs

    answers, theirs = asyncio.run(run())
    codes = [a.status_code for a in answers]
    assert codes.count(200) == 3 and set(codes) == {200, 429}
    ok_ids = {a.headers["x-llmstack-request-id"] for a in answers if a.status_code == 200}
    assert len(ok_ids) == 3 and "the-same-id" not in ok_ids
    assert all(a.headers["x-request-id"] == "the-same-id" for a in answers)
    assert theirs.status_code == 200
    rows = usage_rows(stack, tenant_id="ids-a", client_request_id="the-same-id")
    # one row per admitted request, each under its own server id, each charged
    assert {r["request_id"] for r in rows} == ok_ids
    assert all(r["status"] == 200 and r["cost_usd"] > 0 for r in rows)
    mine = usage_rows(stack, tenant_id="ids-b", client_request_id="the-same-id")
    assert len(mine) == 1 and mine[0]["cost_usd"] > 0 and mine[0]["key_id"] == other["key_id"]
    assert budget(stack, first["key_id"])["reserved_usd"] == 0


def test_concurrent_requests_with_one_id_do_not_abort_each_other(stack):
    key = create_key(stack.base_url, tenant="ids-c")["key"]
    long_body = chat_body(max_tokens=40, ignore_eos=True, stream=True)

    async def run():
        async with http(stack, key) as client:
            async def leaver():
                async with client.stream("POST", "/v1/chat/completions", json=long_body,
                                         headers={"x-request-id": "dup"}) as response:
                    async for _ in response.aiter_lines():
                        return  # leave after the first line: the gateway aborts *this* one

            async def stayer():
                await asyncio.sleep(0.2)
                chunks = []
                async with client.stream("POST", "/v1/chat/completions", json=long_body,
                                         headers={"x-request-id": "dup"}) as response:
                    async for line in response.aiter_lines():
                        chunks.append(line)
                return chunks

            _, kept = await asyncio.gather(leaver(), stayer())
            return kept

    lines = asyncio.run(run())
    assert lines[-1] == "data: [DONE]" or lines[-2:] == ["data: [DONE]", ""]
    assert sum(1 for line in lines if '"content"' in line) >= 30  # it ran to the end


# ---------------------------------------------------------------------------- 3: worst case
def test_concurrent_emoji_prompts_stay_within_tpm(stack):
    tpm = 3000
    created = create_key(stack.base_url, tenant="tpm", tpm=tpm)
    emoji = "🦄🌈🔥🎉" * 60
    body = chat_body(messages=[{"role": "user", "content": emoji}], max_tokens=16)

    async def run():
        async with http(stack, created["key"]) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body)
                                          for _ in range(20)))

    answers = asyncio.run(run())
    used = sum(a.json()["usage"]["total_tokens"] for a in answers if a.status_code == 200)
    assert 0 < used <= tpm
    assert {a.status_code for a in answers} <= {200, 429}


def test_tool_definitions_count_against_the_budget(stack):
    created = create_key(stack.base_url, tenant="tools", tpm=1500)
    tools = [{"type": "function", "function": {
        "name": f"tool_{i}", "description": "does something useful " * 15,
        "parameters": {"type": "object", "properties": {
            f"arg_{j}": {"type": "string", "description": "an argument"} for j in range(6)}}}}
        for i in range(4)]

    async def run():
        async with http(stack, created["key"]) as client:
            return await client.post("/v1/chat/completions",
                                     json=chat_body(tools=tools, max_tokens=16))

    answer = asyncio.run(run())
    # ~1,300 prompt tokens of tool definitions: admitted only if counted within the TPM
    if answer.status_code == 200:
        assert answer.json()["usage"]["total_tokens"] <= 1500
    else:
        assert answer.status_code == 429 and answer.json()["error"]["code"] == "rate_limit_tpm"


# ---------------------------------------------------------------------------- 4: after admission
def test_lone_surrogates_are_refused_and_never_block_a_budget(stack):
    created = create_key(stack.base_url, tenant="surrogate", budget_usd=0.02,
                         budget_period="day")
    raw = ('{"model": "%s", "max_tokens": 4, "messages": [{"role": "user", '
           '"content": "a \\ud800 b"}]}' % MODEL).encode()

    async def run():
        async with http(stack, created["key"]) as client:
            bad = [await client.post("/v1/chat/completions", content=raw,
                                     headers={"content-type": "application/json"})
                   for _ in range(5)]
            good = await client.post("/v1/chat/completions", json=chat_body())
            return bad, good

    bad, good = asyncio.run(run())
    assert {b.status_code for b in bad} == {422}
    assert all(b.json()["error"]["type"] == "invalid_request_error" for b in bad)
    assert good.status_code == 200
    assert budget(stack, created["key_id"])["reserved_usd"] == 0


@pytest.mark.parametrize("leave_after_lines", [1, 3, 1000])
def test_stream_disconnects_at_every_stage_lose_no_row(stack, leave_after_lines):
    tenant = f"disconnect-{leave_after_lines}"
    created = create_key(stack.base_url, tenant=tenant, budget_usd=5.0)
    body = chat_body(max_tokens=8, stream=True)
    count = 12

    async def one(client):
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            seen = 0
            async for _ in response.aiter_lines():
                seen += 1
                if seen >= leave_after_lines:
                    break  # 1000: read everything, then drop the connection at once

    async def run():
        async with http(stack, created["key"]) as client:
            await asyncio.gather(*(one(client) for _ in range(count)))

    asyncio.run(run())
    wait_for(lambda: len(usage_rows(stack, tenant_id=tenant)) == count,
             describe=lambda: [(r["status"], r["error_code"]) for r in
                               usage_rows(stack, tenant_id=tenant)])
    wait_for(lambda: budget(stack, created["key_id"])["reserved_usd"] == 0,
             describe=lambda: (budget(stack, created["key_id"]), [
                 (r["status"], r["error_code"], r["tokens_in"], r["tokens_out"], r["cost_usd"])
                 for r in usage_rows(stack, tenant_id=tenant)]))


# ---------------------------------------------------------------------------- 5: client errors
@pytest.mark.parametrize("extra", [
    {"seed": 2**64},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/gone"}}}}}},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nope"}}}}}]},
])
def test_client_errors_are_4xx_not_outages(stack, extra):
    key = create_key(stack.base_url, tenant="client-errors")["key"]

    async def run():
        async with http(stack, key) as client:
            for model in (MODEL, "auto", "large"):
                yield await client.post("/v1/chat/completions", json=chat_body(model=model,
                                                                               **extra))

    async def collect():
        return [r async for r in run()]

    for answer in asyncio.run(collect()):
        assert 400 <= answer.status_code < 500, answer.text
        assert "x-fallback" not in answer.headers


# ---------------------------------------------------------------------------- 6: admin updates
def test_invalid_admin_updates_change_nothing(stack):
    created = create_key(stack.base_url, tenant="admin-updates", rpm=5)
    with admin_client(stack.base_url) as admin:
        path = f"/admin/v1/keys/{created['key_id']}"
        admin.post(f"{path}/disable").raise_for_status()
        for body in ({"disabled": None}, {"rpm": 2**63}, {"budget_usd": "NaN"},
                     {"rpm": "7"}, {"expires_at": 1e300}):
            answer = admin.patch(path, json=body)
            assert answer.status_code in (400, 422), body
            assert answer.json()["error"]["type"] == "invalid_request_error"
        nan = admin.patch(path, content=b'{"budget_usd": NaN}',
                          headers={"content-type": "application/json"})
        assert nan.status_code in (400, 422)
        state = admin.get(path).json()
        assert state["disabled"] is True and state["rpm"] == 5 and state["budget_usd"] is None
        assert admin.patch(path, json={"rpm": 9}).json()["rpm"] == 9  # later writes work


# ---------------------------------------------------------------------------- 12: floods
def test_unauthenticated_flood_is_cut_before_the_quota(stack):
    # From another loopback address, so the other tests' address keeps its allowance.
    flood = httpx.AsyncHTTPTransport(local_address="127.0.0.3")
    good = create_key(stack.base_url, tenant="flood")["key"]

    async def run():
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=60,
                                     transport=flood) as client:
            first = await client.post("/v1/chat/completions", json=chat_body(),
                                      headers={"authorization": f"Bearer {good}"})
            bogus = {"authorization": "Bearer sk-AAAAAAAAAAAA_" + "b" * 40}
            answers = await asyncio.gather(*(client.post(
                "/v1/chat/completions", json=chat_body(), headers=bogus) for _ in range(120)))
            again = await client.post("/v1/chat/completions", json=chat_body(),
                                      headers={"authorization": f"Bearer {good}"})
            return first, answers, again

    first, answers, again = asyncio.run(run())
    codes = [a.status_code for a in answers]
    assert set(codes) == {401, 429} and codes.count(401) <= 40
    limited = next(a for a in answers if a.status_code == 429)
    assert limited.json()["error"]["code"] == "too_many_unauthenticated"
    assert int(limited.headers["retry-after"]) >= 1
    assert first.status_code == 200 and again.status_code == 200  # a known key still works


def test_readiness_floods_do_not_slow_real_traffic(stack):
    key = create_key(stack.base_url, tenant="ready")["key"]

    async def run():
        async with http(stack) as probes, http(stack, key) as client:
            flood = asyncio.gather(*(probes.get("/readyz") for _ in range(200)))
            started = time.monotonic()
            answer = await client.post("/v1/chat/completions", json=chat_body())
            elapsed = time.monotonic() - started
            return await flood, answer, elapsed

    probes, answer, _ = asyncio.run(run())
    assert {p.status_code for p in probes} == {200} and answer.status_code == 200


# ---------------------------------------------------------------------------- 13: allowed models
def test_allowed_models_apply_to_the_model_that_answers(stack):
    # Router aliases only: the key may ask for them, but no listed model may answer.
    aliases_only = create_key(stack.base_url, tenant="allowed",
                              allowed_models=["auto", "small", "medium", "large"])
    local_too = create_key(stack.base_url, tenant="allowed", allowed_models=["auto", MODEL])

    async def run(key, names):
        async with http(stack, key) as client:
            return [await client.post("/v1/chat/completions", json=chat_body(model=name))
                    for name in names]

    for answer in asyncio.run(run(aliases_only["key"], ("auto", "small", "large"))):
        # offline every chain ends on the local model, which this key may not use
        assert answer.status_code == 403, answer.text
        assert answer.json()["error"]["code"] == "model_not_allowed"
    routed, = asyncio.run(run(local_too["key"], ("auto",)))
    assert routed.status_code == 200 and routed.headers["x-model"] == MODEL
