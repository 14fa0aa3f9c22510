"""Class 6 (admin updates validate fully, write the database, then memory; a failed update
changes nothing), class 12 (readiness is cached; unauthenticated traffic is limited per
address), class 5 (client errors are 4xx and never fall back) and class 13 (allowed_models
bound the model that answers)."""
from __future__ import annotations

import asyncio
import sqlite3

import pytest
from pydantic import ValidationError

from serve_app.accounts.store import AccountStore
from serve_app.address_gate import AddressGate
from serve_app.admin_protocol import KeyUpdate
from serve_app.errors import ApiError
from serve_app.protocol import ChatCompletionRequest
from serve_app.readiness import CachedReadiness
from serve_app.routing.config import RouterSettings
from tests.support.chat_harness import LOCAL, context, make_service

KEY = "sk-aaaaaaaaaaaa_" + "b" * 32


# ---------------------------------------------------------------------------- admin updates
@pytest.mark.parametrize("body", [
    {"disabled": None}, {"can_confirm": None}, {"rpm": 2**63}, {"tpm": -1},
    {"budget_usd": float("nan")}, {"budget_usd": float("inf")}, {"expires_at": 1e300},
    {"allowed_models": ["x"] * 1000}, {"alert_webhook_url": "javascript:alert(1)"},
    {"budget_period": "week"}, {"name": None}, {"rpm": "12"}, {"disabled": "yes"},
])
def test_invalid_admin_values_are_refused_before_anything_changes(body) -> None:
    with pytest.raises(ValidationError):
        KeyUpdate.model_validate(body)


def test_limits_can_still_be_cleared_with_null() -> None:
    assert KeyUpdate.model_validate({"rpm": None, "budget_usd": None}).model_dump(
        exclude_unset=True) == {"rpm": None, "budget_usd": None}


@pytest.mark.parametrize("fields", [{"disabled": None}, {"rpm": 2**63}, {"rpm": 1.5},
                                    {"budget_usd": float("nan")}, {"budget_period": "x"}])
def test_store_refuses_bad_values_and_keeps_memory_and_disk_as_they_were(tmp_path,
                                                                        fields) -> None:
    store = AccountStore(tmp_path / "a.db", b"p")
    record, _ = store.create_key("t", rpm=5)
    store.update(record.key_id, disabled=True)
    with pytest.raises(ValueError):
        store.update(record.key_id, **fields)
    assert store.get(record.key_id).disabled is True and store.get(record.key_id).rpm == 5
    reopened = AccountStore(tmp_path / "a.db", b"p")
    assert reopened.get(record.key_id).disabled is True and reopened.get(record.key_id).rpm == 5
    store.update(record.key_id, rpm=7)  # later writes still work
    assert AccountStore(tmp_path / "a.db", b"p").get(record.key_id).rpm == 7


def test_a_failed_database_write_changes_nothing_in_memory(tmp_path, monkeypatch) -> None:
    store = AccountStore(tmp_path / "a.db", b"p")
    record, _ = store.create_key("t")
    store.update(record.key_id, disabled=True)

    def failing_save(candidate):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "_save", failing_save)
    with pytest.raises(sqlite3.OperationalError):
        store.update(record.key_id, disabled=False)
    with pytest.raises(sqlite3.OperationalError):
        store.rotate(record.key_id)
    assert store.get(record.key_id).disabled is True


# ---------------------------------------------------------------------------- readiness
async def test_a_flood_of_readiness_probes_costs_one_generation() -> None:
    calls = 0

    async def probe():
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return {"ready": True}

    now = [0.0]
    readiness = CachedReadiness(probe, ttl_s=5, clock=lambda: now[0])
    results = await asyncio.gather(*(readiness.check() for _ in range(200)))
    assert all(r["ready"] for r in results) and calls == 1
    await asyncio.gather(*(readiness.check() for _ in range(50)))
    assert calls == 1
    now[0] = 6.0
    await readiness.check()
    assert calls == 2


async def test_a_failing_probe_is_not_ready_and_cached_too() -> None:
    async def probe():
        raise RuntimeError("engine down")

    readiness = CachedReadiness(probe, ttl_s=5)
    assert (await readiness.check())["ready"] is False
    assert readiness.probes_run == 1


# ---------------------------------------------------------------------------- address gate
def test_unauthenticated_burst_is_cut_exactly_per_address_and_good_keys_pass() -> None:
    now = [0.0]
    gate = AddressGate(10, window_s=60, clock=lambda: now[0])
    _, slot = gate.enter("10.0.0.1", "sk-good")
    gate.leave("10.0.0.1", "sk-good", slot, authenticated=True)
    # a concurrent burst: every request enters before any has finished
    entered = [gate.enter("10.0.0.9", "sk-bogus") for _ in range(100)]
    passed = [slot for wait, slot in entered if wait is None]
    assert len(passed) == 10 and all(wait >= 1 for wait, _ in entered[10:])
    for slot in passed:
        gate.leave("10.0.0.9", "sk-bogus", slot, authenticated=False)
    assert gate.enter("10.0.0.9", None)[0] is not None
    assert gate.enter("10.0.0.9", "sk-good")[0] is None  # known-good key: same NAT is fine
    assert gate.enter("10.0.0.2", None)[0] is None  # other addresses unaffected
    now[0] = 61.0
    assert gate.enter("10.0.0.9", None)[0] is None


def test_authenticated_requests_give_their_slot_back() -> None:
    gate = AddressGate(3)
    for i in range(20):  # new keys, each authenticates: never limited
        wait, slot = gate.enter("10.0.0.5", f"sk-new-{i}")
        assert wait is None
        gate.leave("10.0.0.5", f"sk-new-{i}", slot, authenticated=True)


def test_requests_whose_key_could_not_be_checked_give_their_slot_back() -> None:
    """test_gateway's Quota-kill test caught it: while a shard restarted, valid keys not
    yet known-good on a gateway got 503s that kept their slots, and the address's next
    requests were refused 429 as an unauthenticated flood."""
    gate = AddressGate(3)
    for _ in range(20):  # the Quota service is down: every answer is a 503
        wait, slot = gate.enter("10.0.0.7", "sk-valid")
        assert wait is None
        gate.leave("10.0.0.7", "sk-valid", slot, authenticated=False, undecided=True)
    # ...and the key did not become known-good: after 3 refusals the address is cut.
    for _ in range(3):
        _, slot = gate.enter("10.0.0.7", "sk-bogus")
        gate.leave("10.0.0.7", "sk-bogus", slot, authenticated=False)
    assert gate.enter("10.0.0.7", "sk-valid")[0] is not None


@pytest.mark.parametrize("addresses", [1_000, 8_000])
def test_gate_memory_is_bounded_whatever_the_number_of_addresses(addresses) -> None:
    gate = AddressGate(5, max_addresses=500, max_keys=500)
    for i in range(addresses):
        address = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
        _, slot = gate.enter(address, f"sk-{i}")
        gate.leave(address, f"sk-{i}", slot, authenticated=i % 2 == 0)
    assert len(gate._slots) == 500 and len(gate._good_keys) == 500


# ---------------------------------------------------------------------------- client errors
@pytest.mark.parametrize("extra", [
    {"seed": 2**64}, {"seed": -(2**63) - 1},
    {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 7}}}},
    {"response_format": {"type": "json_schema",
                         "json_schema": {"schema": {"$ref": "#/$defs/missing"}}}},
    {"response_format": {"type": "json_schema",
                         "json_schema": {"schema": {"$ref": "https://evil.example/s"}}}},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}]},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "$ref": "#/definitions/nope"}}}]},
    {"messages": [{"role": "user", "content": "\ud800"}]},
    {"max_tokens": 10**12},
])
def test_invalid_requests_are_refused_at_the_edge(extra) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_deep_schemas_are_refused_without_recursion() -> None:
    schema: dict = {"type": "string"}
    for _ in range(10_000):
        schema = {"type": "array", "items": schema}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}
    with pytest.raises((ValidationError, RecursionError)):
        ChatCompletionRequest.model_validate(body)


def _paid_settings() -> RouterSettings:
    return RouterSettings.model_validate({
        "providers": [{"name": "paid", "base_url": "http://127.0.0.1:9/v1", "model": "paid-1",
                       "api_key_env": "PAID_KEY"}],
        "tiers": {"small": ["local", "paid"], "medium": ["local", "paid"],
                  "large": ["local", "paid"]}})


async def test_an_engine_refusal_is_a_400_and_never_reaches_a_paid_provider() -> None:
    service, accounting, local, provider = make_service(
        router_settings=_paid_settings(), environ={"PAID_KEY": "x"})
    refusal = ApiError(400, "The model cannot run this request", code="invalid_request")

    async def refuse(request, request_id):
        return refusal.to_payload()

    service.router.chains.local.complete = refuse
    request = ChatCompletionRequest.model_validate(
        {"model": "small", "messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(ApiError) as caught:
        await service.handle(request, context(), KEY)
    assert caught.value.status == 400 and provider.requests == []


def test_engine_maps_what_vllm_refuses_to_400() -> None:
    from serve_app.llm import vllm_engine

    error = vllm_engine._invalid_request(ValueError("bad grammar"))
    assert error.status == 400 and error.code == "invalid_request"
    assert issubclass(OverflowError, vllm_engine._REQUEST_ERRORS)


# ---------------------------------------------------------------------------- allowed models
async def test_allowed_models_bound_the_model_that_answers() -> None:
    service, accounting, local, provider = make_service(
        router_settings=_paid_settings(), environ={"PAID_KEY": "x"})
    local.fail = RuntimeError("local down")  # the chain would fall back to the paid model

    async def admit_only_local(**kwargs):
        accounting.admitted.append(kwargs)
        return {"principal": {"tenant_id": "t", "key_id": "k", "route_overrides": {},
                              "cache_sampled": False, "allowed_models": ["small", LOCAL]}}

    accounting.admit = admit_only_local
    request = ChatCompletionRequest.model_validate(
        {"model": "small", "messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(ApiError) as caught:
        await service.handle(request, context(), KEY)
    assert caught.value.status == 503 and provider.requests == []  # never the paid model

    async def admit_none(**kwargs):
        return {"principal": {"tenant_id": "t", "key_id": "k", "route_overrides": {},
                              "cache_sampled": False, "allowed_models": ["small"]}}

    accounting.admit = admit_none
    with pytest.raises(ApiError) as caught:
        await service.handle(request, context(), KEY)
    assert caught.value.status == 403 and caught.value.code == "model_not_allowed"
