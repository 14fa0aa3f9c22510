"""Gateway pattern through HTTP, on PostgreSQL: keys, limits with two Gateway replicas over
two Quota shards, budgets, alerts, revocation through every gateway, ledger durability
across a Quota shard kill and a PostgreSQL restart, admin API and CLI, no key material in
logs. (The other integration modules run on the SQLite default.)"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.conftest import TEST_DATABASE_ENV
from tests.support.keys import TEST_ADMIN_KEY, admin_client, create_key
from tests.support.webhook import WebhookRecorder

MODEL = "smollm2-135m-instruct"
HI = [{"role": "user", "content": "Say hi."}]
WINDOW_S = 6.0
PRICE_PER_TOKEN = 0.001  # $1000 per million tokens, in and out, to make spend visible


@pytest.fixture(scope="module")
def webhook():
    with WebhookRecorder() as recorder:
        yield recorder


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory, webhook):
    data_dir = tmp_path_factory.mktemp("gateway")
    cluster.deploy_stack(
        data_dir,
        {"database": {"url_env": TEST_DATABASE_ENV},
         "quota": {"shards": 2, "window_s": WINDOW_S, "alert_webhook_url": webhook.url,
                   "webhook_first_delay_s": 0.05, "settle_retry_s": 60},
         "router": {"local": {"price_in_per_mtok": PRICE_PER_TOKEN * 1e6,
                              "price_out_per_mtok": PRICE_PER_TOKEN * 1e6}},
         "gateway": {"log_prompts": "hash"},
         # Limits and budgets are about generated answers: its repeated prompts set no
         # temperature, which the cache would serve (at $0) by default.
         "cache": {"enabled": False}},
        deployments={"Gateway": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}}})
    cluster.data_dir = data_dir
    return cluster


def client_for(stack, key: str | None) -> OpenAI:
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key=key or "", max_retries=0,
                  timeout=120)


async def burst(stack, key: str, count: int, **params) -> list:
    async with AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0,
                           timeout=180) as aclient:
        async def one():
            try:
                return await aclient.chat.completions.with_raw_response.create(
                    model=MODEL, messages=HI, **params)
            except openai.APIStatusError as error:
                return error
        return await asyncio.gather(*(one() for _ in range(count)))


def statuses(results) -> list[int]:
    return [r.status_code if isinstance(r, openai.APIStatusError) else r.http_response.status_code
            for r in results]


# ---------------------------------------------------------------------------- authentication
def test_requests_without_a_valid_key_are_401(stack):
    http = httpx.Client(base_url=stack.base_url, timeout=60)
    body = {"model": MODEL, "messages": HI, "max_tokens": 2}
    cases = {
        "no key": ({}, "missing_api_key"),
        "unknown key": ({"authorization": "Bearer sk-AAAAAAAAAAAA_" + "b" * 43}, "invalid_api_key"),
        "garbage": ({"authorization": "Bearer hello"}, "invalid_api_key"),
    }
    for name, (headers, code) in cases.items():
        response = http.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 401, name
        assert response.json()["error"]["code"] == code
        assert response.json()["error"]["type"] == "authentication_error"
    assert http.get("/v1/models").status_code == 401


def test_disabled_and_expired_keys_are_401_and_model_not_allowed_is_403(stack):
    disabled = create_key(stack.base_url)
    with admin_client(stack.base_url) as admin:
        assert admin.post(f"/admin/v1/keys/{disabled['key_id']}/disable").json()["disabled"]
    expired = create_key(stack.base_url, expires_at=time.time() - 5)
    restricted = create_key(stack.base_url, allowed_models=["some-other-model"])
    for key, code in ((disabled["key"], "key_disabled"), (expired["key"], "key_expired")):
        with pytest.raises(openai.AuthenticationError) as caught:
            client_for(stack, key).chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
        assert caught.value.code == code
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client_for(stack, restricted["key"]).chat.completions.create(
            model=MODEL, messages=HI, max_tokens=2)
    assert caught.value.code == "model_not_allowed"
    # Re-enabling restores access.
    with admin_client(stack.base_url) as admin:
        admin.post(f"/admin/v1/keys/{disabled['key_id']}/enable").raise_for_status()
    reply = client_for(stack, disabled["key"]).chat.completions.create(
        model=MODEL, messages=HI, max_tokens=2)
    assert reply.usage.completion_tokens >= 1


# ---------------------------------------------------------------------------- rate limits
def test_rpm_holds_exactly_across_two_gateway_replicas_and_refills(stack):
    from ray import serve

    gateway = serve.status().applications["stack"].deployments["Gateway"]
    assert gateway.replica_states.get("RUNNING") == 2
    key = create_key(stack.base_url, rpm=4)["key"]
    results = asyncio.run(burst(stack, key, 12, max_tokens=1))
    codes = statuses(results)
    assert codes.count(200) == 4, codes
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert all(r.status_code == 429 and r.code == "rate_limit_rpm" for r in refused)
    assert all(int(r.response.headers["retry-after"]) >= 1 for r in refused)
    time.sleep(WINDOW_S + 0.5)
    assert statuses(asyncio.run(burst(stack, key, 1, max_tokens=1))) == [200]


def test_rpm_holds_exactly_for_keys_on_both_quota_shards(stack):
    """Keys owned by both shards, bursts on all at once through both gateways."""
    from serve_app.quota.sharding import shard_of

    keys: dict[int, list[str]] = {0: [], 1: []}
    while min(len(v) for v in keys.values()) < 2:
        created = create_key(stack.base_url, rpm=3)
        keys[shard_of(created["key_id"], 2)].append(created["key"])
    chosen = keys[0][:2] + keys[1][:2]

    async def all_bursts() -> list[list]:
        return await asyncio.gather(*(burst(stack, key, 8, max_tokens=1) for key in chosen))

    for results in asyncio.run(all_bursts()):
        codes = statuses(results)
        assert codes.count(200) == 3 and codes.count(429) == 5, codes


def test_a_revoked_key_is_refused_on_the_very_next_request_through_every_gateway(stack):
    created = create_key(stack.base_url)
    client = client_for(stack, created["key"])
    assert client.models.list().data
    with admin_client(stack.base_url) as admin:
        admin.post(f"/admin/v1/keys/{created['key_id']}/disable").raise_for_status()
    # Ten requests spread over both Gateway replicas (the proxy picks): none gets through.
    codes = statuses(asyncio.run(burst(stack, created["key"], 10, max_tokens=1)))
    assert codes == [401] * 10
    with admin_client(stack.base_url) as admin:
        admin.post(f"/admin/v1/keys/{created['key_id']}/enable").raise_for_status()
        rotated = admin.post(f"/admin/v1/keys/{created['key_id']}/rotate", json={}).json()
    assert statuses(asyncio.run(burst(stack, created["key"], 10, max_tokens=1))) == [401] * 10
    assert statuses(asyncio.run(burst(stack, rotated["key"], 2, max_tokens=1))) == [200] * 2


_PROMPT_TOKENS: list[int] = []


def prompt_tokens(stack) -> int:
    """What the gateway reserves for HI's prompt: the local model's exact count (the
    chat template included), which is also what the engine reports."""
    if not _PROMPT_TOKENS:
        key = create_key(stack.base_url, tenant="probe")["key"]
        reply = client_for(stack, key).chat.completions.create(model=MODEL, messages=HI,
                                                               max_tokens=1)
        _PROMPT_TOKENS.append(reply.usage.prompt_tokens)
    return _PROMPT_TOKENS[0]


def test_tpm_holds_exactly_with_concurrent_requests(stack):
    per_request = prompt_tokens(stack) + 20
    key = create_key(stack.base_url, tpm=per_request * 3)["key"]
    results = asyncio.run(burst(stack, key, 8, max_tokens=20))
    codes = statuses(results)
    assert codes.count(200) == 3, codes
    assert {r.code for r in results if isinstance(r, openai.APIStatusError)} == {"rate_limit_tpm"}


# ---------------------------------------------------------------------------- budgets
def _budget(stack, key_id: str) -> dict:
    with admin_client(stack.base_url) as admin:
        return admin.get(f"/admin/v1/keys/{key_id}/budget").json()


def test_budget_reserves_worst_case_then_refunds_on_settlement(stack):
    created = create_key(stack.base_url, budget_usd=0.2, budget_period="day")
    client = client_for(stack, created["key"])
    prompt = prompt_tokens(stack)
    too_big = int(0.2 / PRICE_PER_TOKEN) - prompt + 5  # worst case just over the budget
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=too_big)
    assert caught.value.code == "budget_exceeded"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    reply = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=40)
    status = _budget(stack, created["key_id"])
    real_cost = (reply.usage.prompt_tokens + reply.usage.completion_tokens) * PRICE_PER_TOKEN
    assert status["spent_usd"] == pytest.approx(real_cost)
    assert status["reserved_usd"] == pytest.approx(0)
    assert status["remaining_usd"] == pytest.approx(0.2 - real_cost)


def test_concurrent_requests_cannot_jointly_overspend(stack):
    created = create_key(stack.base_url, budget_usd=0.15, budget_period="month")
    worst = (prompt_tokens(stack) + 40) * PRICE_PER_TOKEN
    results = asyncio.run(burst(stack, created["key"], 10, max_tokens=40))
    codes = statuses(results)
    assert codes.count(200) == int(0.15 // worst), codes
    assert set(codes) <= {200, 429}
    assert _budget(stack, created["key_id"])["spent_usd"] <= 0.15


def test_alert_fires_once_per_threshold_with_webhook(stack, webhook):
    created = create_key(stack.base_url, budget_usd=0.5, budget_period="day")
    client = client_for(stack, created["key"])
    for _ in range(40):
        try:
            client.chat.completions.create(model=MODEL, messages=HI, max_tokens=16,
                                           extra_body={"ignore_eos": True})
        except openai.RateLimitError:
            break
    deadline = time.monotonic() + 20
    mine = []
    while time.monotonic() < deadline:
        mine = [a for a in webhook.received if a["key_id"] == created["key_id"]]
        if len(mine) >= 2:
            break
        time.sleep(0.2)
    thresholds = sorted(a["threshold"] for a in mine)
    assert thresholds[:2] == [0.5, 0.8]
    assert len(thresholds) == len(set(thresholds))  # never twice
    assert all(a["type"] == "budget_alert" and a["tenant_id"] == "tests" for a in mine)


# ---------------------------------------------------------------------------- ledger
def _kill_quota_shard(shard: int) -> None:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if f"#Quota-{shard}#" in a["name"]]
    assert len(names) == 1
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)


def _load_with_a_fault(stack, key: str, *, requests: int, spacing_s: float,
                       max_tokens: int, prompt: str, fault_at_s: float, fault) -> list:
    """`requests` chat calls `spacing_s` apart while `fault()` runs (in a thread) at
    `fault_at_s`; each result is a raw response or the APIStatusError."""
    async def load() -> list:
        async with AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0,
                               timeout=180) as aclient:
            async def one(i: int):
                await asyncio.sleep(i * spacing_s)
                try:
                    return await aclient.chat.completions.with_raw_response.create(
                        model=MODEL, max_tokens=max_tokens, extra_body={"ignore_eos": True},
                        messages=[{"role": "user", "content": prompt.format(i)}])
                except openai.APIStatusError as error:
                    return error

            async def inject():
                await asyncio.sleep(fault_at_s)
                await asyncio.to_thread(fault)

            results = await asyncio.gather(*(one(i) for i in range(requests)), inject())
            return results[:-1]

    return asyncio.run(load())


def _assert_every_200_has_its_row(stack, results: list, tokens_out: int,
                                  at_least: int) -> None:
    ok_ids = [r.http_response.headers["x-llmstack-request-id"] for r in results
              if not isinstance(r, openai.APIStatusError)]
    assert len(ok_ids) >= at_least
    with admin_client(stack.base_url) as admin:
        for request_id in ok_ids:
            row = admin.get(f"/admin/v1/usage/requests/{request_id}")
            assert row.status_code == 200, request_id
            assert row.json()["status"] == 200 and row.json()["tokens_out"] == tokens_out


def test_every_200_has_a_ledger_row_even_when_quota_is_killed_mid_load(stack):
    from serve_app.quota.sharding import shard_of

    created = create_key(stack.base_url)
    owner = shard_of(created["key_id"], 2)
    results = _load_with_a_fault(
        stack, created["key"], requests=30, spacing_s=0.15, max_tokens=12,
        prompt="Number {}?", fault_at_s=1.5, fault=lambda: _kill_quota_shard(owner))
    assert set(statuses(results)) <= {200, 503}
    stack.wait_ready()
    _assert_every_200_has_its_row(stack, results, tokens_out=12, at_least=5)


def test_every_200_has_a_ledger_row_across_a_postgres_restart_mid_load(stack,
                                                                       postgres_server):
    """Admission of a key already seen needs no database; settlements that hit the
    restart fail, the Quota says 503, the gateway retries them until the server is back."""
    created = create_key(stack.base_url, rpm=25)
    key = created["key"]
    assert statuses(asyncio.run(burst(stack, key, 1, max_tokens=1))) == [200]  # first sight
    results = _load_with_a_fault(
        stack, key, requests=30, spacing_s=0.1, max_tokens=4, prompt="Count to {}.",
        fault_at_s=0.8, fault=lambda: postgres_server.restart("immediate"))
    codes = statuses(results)
    assert set(codes) <= {200, 429, 503}, codes
    assert codes.count(200) + 1 <= 25  # the RPM held through the restart
    _assert_every_200_has_its_row(stack, results, tokens_out=4, at_least=10)


def test_usage_and_spend_are_reported_per_key_tenant_and_model(stack):
    created = create_key(stack.base_url, tenant="reporting")
    client = client_for(stack, created["key"])
    replies = [client.chat.completions.create(model=MODEL, messages=HI, max_tokens=5)
               for _ in range(3)]
    tokens_out = sum(r.usage.completion_tokens for r in replies)
    with admin_client(stack.base_url) as admin:
        by_key = admin.get("/admin/v1/usage", params={"group_by": "key",
                                                      "key_id": created["key_id"]}).json()
        row = by_key["data"][0]
        assert row["requests"] == 3 and row["tokens_out"] == tokens_out
        assert row["cost_usd"] == pytest.approx(
            sum(r.usage.total_tokens for r in replies) * PRICE_PER_TOKEN)
        by_tenant = admin.get("/admin/v1/usage", params={"group_by": "tenant"}).json()["data"]
        assert any(r["tenant"] == "reporting" and r["requests"] == 3 for r in by_tenant)
        by_model = admin.get("/admin/v1/usage", params={"group_by": "model",
                                                        "tenant_id": "reporting"}).json()
        assert by_model["data"][0]["model"] == MODEL
        future = admin.get("/admin/v1/usage", params={"start": time.time() + 3600}).json()
        assert future["data"] == []


# ---------------------------------------------------------------------------- admin API and CLI
def test_admin_api_needs_the_admin_key(stack):
    user_key = create_key(stack.base_url)["key"]
    with httpx.Client(base_url=stack.base_url, timeout=30) as http:
        assert http.get("/admin/v1/keys").status_code == 401
        forbidden = http.get("/admin/v1/keys", headers={"authorization": f"Bearer {user_key}"})
        assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "not_admin"


def test_admin_api_update_and_rotate(stack):
    created = create_key(stack.base_url, rpm=100)
    assert "key_hash" not in created and created["key"].startswith("sk-")
    with admin_client(stack.base_url) as admin:
        updated = admin.patch(f"/admin/v1/keys/{created['key_id']}",
                              json={"rpm": None, "tpm": 5000, "budget_usd": 1.0}).json()
        assert updated["rpm"] is None and updated["tpm"] == 5000
        listed = admin.get("/admin/v1/keys", params={"tenant_id": "tests"}).json()["data"]
        assert created["key_id"] in {k["key_id"] for k in listed}
        assert all("key" not in k for k in listed)
        bad = admin.patch(f"/admin/v1/keys/{created['key_id']}", json={"rpm": -3})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "rpm"
        assert admin.get("/admin/v1/keys/nope").status_code == 404
        rotated = admin.post(f"/admin/v1/keys/{created['key_id']}/rotate", json={}).json()
    assert rotated["key"] != created["key"] and rotated["key_id"] == created["key_id"]
    with pytest.raises(openai.AuthenticationError):
        client_for(stack, created["key"]).models.list()
    assert client_for(stack, rotated["key"]).models.list().data


def test_admin_cli_uses_the_same_api(stack):
    env = {**os.environ, "LLMSTACK_ADMIN_KEY": TEST_ADMIN_KEY, "LLMSTACK_BASE_URL": stack.base_url}

    def cli(*args: str) -> dict:
        result = subprocess.run([sys.executable, "-m", "serve_app.admin", *args], env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    created = cli("keys", "create", "--tenant", "cli", "--rpm", "7", "--budget-usd", "2",
                  "--period", "day", "--models", MODEL)
    assert created["rpm"] == 7 and created["allowed_models"] == [MODEL]
    assert cli("keys", "update", created["key_id"], "--tpm", "900", "--clear", "rpm")["rpm"] is None
    client_for(stack, created["key"]).chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    budget = cli("keys", "budget", created["key_id"])
    assert budget["budget_usd"] == 2 and budget["spent_usd"] > 0
    usage = cli("usage", "--group-by", "tenant", "--since", "1h")
    assert any(row["tenant"] == "cli" for row in usage["data"])
    assert cli("keys", "disable", created["key_id"])["disabled"] is True


# ---------------------------------------------------------------------------- logs
def test_key_material_never_appears_in_logs(stack):
    created = create_key(stack.base_url)
    client = client_for(stack, created["key"])
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    list(client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, stream=True))
    wrong = created["key"][:-4] + "zzzz"
    with pytest.raises(openai.AuthenticationError):
        client_for(stack, wrong).chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    time.sleep(2)  # let log files flush
    import ray

    session_logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    files = [p for p in session_logs.rglob("*") if p.is_file()]
    files += [p for p in (stack.data_dir / "logs").rglob("*") if p.is_file()]
    secrets = [created["key"], wrong, TEST_ADMIN_KEY, created["key"].split("_", 1)[1]]
    for path in files:
        content = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in content, f"secret found in {path}"
    request_log = (stack.data_dir / "logs" / "requests.jsonl").read_text()
    assert created["key_id"] in request_log  # the public id is what logs carry
    assert "sha256:" in request_log and "Say hi." not in request_log  # prompts hashed
