import json

import pytest
from pydantic import ValidationError

from serve_app.cache.config import CALIBRATED_THRESHOLD, CacheSettings
from serve_app.cache.policy import CacheDecision, normalize_prompt, plan_cache, prompt_hash
from serve_app.errors import ApiError
from serve_app.protocol import ChatCompletionRequest
from serve_app.settings import PROJECT_ROOT

SETTINGS = CacheSettings()


def request(**overrides):
    body = {"model": "smollm2-135m-instruct", "temperature": 0,
            "messages": [{"role": "system", "content": "You are terse."},
                         {"role": "user", "content": "What is the capital of France?"}]}
    body.update(overrides)
    return ChatCompletionRequest.model_validate(body).model_dump()


def plan(body=None, headers=None, settings=SETTINGS, **kwargs):
    return plan_cache(body or request(), headers, settings, **kwargs)


def test_deterministic_request_is_looked_up_and_stored():
    decision = plan()
    assert (decision.lookup, decision.store, decision.reason) == (True, True, None)
    assert decision.query_text == "What is the capital of France?"
    assert decision.prompt_hash == prompt_hash("what is the capital of france")
    assert decision.namespace == "default" and decision.semantic


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"temperature": 0.7}, "temperature"),
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "lookup"}}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "hello"}]}, "last_message_not_user"),
    ({"messages": [{"role": "user", "content": "   "}]}, "empty_prompt"),
])
def test_not_cacheable_requests_skip_lookup_and_store(overrides, reason):
    decision = plan(request(**overrides))
    assert not decision.lookup and not decision.store
    assert decision.reason == reason


def test_an_unset_temperature_is_cacheable_by_default_and_sampled_when_configured():
    """The OpenAI SDK sends no temperature unless asked: those clients must get hits."""
    unset = request(temperature=None)
    assert plan(unset).cacheable
    assert plan(unset).scope_key != plan(request(temperature=0)).scope_key
    as_sampled = CacheSettings(unset_temperature="sampled")
    assert plan(unset, settings=as_sampled).reason == "temperature"
    assert plan(unset, settings=as_sampled, allow_sampled=True).cacheable


def test_sampled_requests_are_cached_when_the_key_or_the_settings_opt_in():
    sampled = request(temperature=0.8)
    assert plan(sampled, allow_sampled=True).cacheable
    assert plan(sampled, settings=CacheSettings(allow_temperature=True)).cacheable
    assert plan(sampled).reason == "temperature"


def test_disabled_cache_never_looks_up():
    assert plan(settings=CacheSettings(enabled=False)).reason == "disabled"


@pytest.mark.parametrize(("cache", "headers", "lookup", "store"), [
    ({"no_cache": True}, None, False, True),
    ({"no_store": True}, None, True, False),
    (None, {"Cache-Control": "no-cache"}, False, True),
    (None, {"cache-control": "max-age=0, No-Store"}, True, False),
    (None, {"Pragma": "no-cache"}, False, True),
    ({"no_cache": True, "no_store": True}, None, False, False),
])
def test_request_and_header_controls(cache, headers, lookup, store):
    decision = plan(request(cache=cache) if cache else request(), headers)
    assert (decision.lookup, decision.store) == (lookup, store)


def test_ttl_threshold_and_namespace_from_the_body():
    decision = plan(request(cache={"ttl": 60, "threshold": 0.97, "namespace": "faq"}))
    assert (decision.ttl_s, decision.threshold, decision.namespace) == (60, 0.97, "faq")
    clamped = plan(request(cache={"ttl": 10**9}), settings=CacheSettings(max_ttl_s=3600))
    assert clamped.ttl_s == 3600


@pytest.mark.parametrize(("cache", "param"), [
    ({"ttl": -1}, "cache.ttl"),
    ({"threshold": 0.2}, "cache.threshold"),  # below min_request_threshold
    ({"threshold": 1.5}, "cache.threshold"),
    ({"namespace": "no spaces"}, "cache.namespace"),
    ({"nocache": True}, "cache.nocache"),
    ("yes", "cache"),
])
def test_invalid_cache_controls_are_422_with_the_field(cache, param):
    with pytest.raises(ApiError) as caught:
        plan(request(cache=cache))
    assert caught.value.status == 422
    assert caught.value.param == param


def test_scope_key_ignores_what_cannot_change_the_answer():
    base = plan().scope_key
    assert plan(request(stream=True)).scope_key == base
    assert plan(request(user="end-user-7")).scope_key == base
    assert plan(request(cache={"no_store": True})).scope_key == base
    assert plan(request(temperature=0.0)).scope_key == base


@pytest.mark.parametrize("overrides", [
    {"model": "auto"},
    {"max_tokens": 16},
    {"top_p": 0.5},
    {"stop": ["\n"]},
    {"seed": 7},
    {"response_format": {"type": "json_object"}},
    {"presence_penalty": 1.0},
    {"retrieval": {"collection": "handbook"}},  # unknown extras count as answer-shaping
    {"cache": {"namespace": "faq"}},
    {"messages": [{"role": "system", "content": "Answer in French."},
                  {"role": "user", "content": "What is the capital of France?"}]},
    {"messages": [{"role": "user", "content": "Let's talk about Spain."},
                  {"role": "assistant", "content": "Sure."},
                  {"role": "user", "content": "What is the capital of France?"}]},
])
def test_scope_key_changes_with_anything_that_shapes_the_answer(overrides):
    changed = plan(request(**overrides))
    assert changed.scope_key != plan().scope_key
    assert changed.query_text == "What is the capital of France?"


def test_prompt_hash_normalises_case_space_and_end_punctuation():
    assert normalize_prompt("  What IS the capital\n of France ?? ") == \
        "what is the capital of france"
    assert prompt_hash("What is the capital of France?") == prompt_hash("what is the  capital of france")
    assert prompt_hash("What is the capital of France?") != prompt_hash("What is the capital of Spain?")


def test_content_parts_equal_plain_text():
    parts = request(messages=[{"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
                              {"role": "user", "content": [{"type": "text", "text": "What is the "},
                                                           {"type": "text", "text": "capital of France?"}]}])
    assert plan(parts).scope_key == plan().scope_key
    assert plan(parts).prompt_hash == plan().prompt_hash


def test_long_prompts_are_matched_exactly_only():
    long = request(messages=[{"role": "user", "content": "word " * 400}])
    decision = plan(long)
    assert decision.lookup and not decision.semantic


def test_decision_round_trips_as_a_dict():
    decision = plan(request(cache={"ttl": 5}))
    as_dict = json.loads(json.dumps(decision.to_dict()))
    assert CacheDecision.from_dict(as_dict) == decision


def test_default_threshold_is_the_calibrated_one():
    result = json.loads((PROJECT_ROOT / "benchmarks/results/cache_calibration.json").read_text())
    assert result["chosen"]["guard"]["threshold"] == CALIBRATED_THRESHOLD
    assert CacheSettings().similarity_threshold == CALIBRATED_THRESHOLD


def test_namespace_settings():
    settings = CacheSettings(namespace_thresholds={"faq": 0.88},
                             namespace_ttl_s={"news": 600, "docs": None})
    assert settings.threshold_for("faq") == 0.88
    assert settings.threshold_for("other") == CALIBRATED_THRESHOLD
    assert settings.ttl_for("news") == 600
    assert settings.ttl_for("docs") is None
    assert settings.ttl_for("other") == settings.default_ttl_s


@pytest.mark.parametrize("bad", [
    {"namespace_thresholds": {"faq": 1.5}},
    {"namespace_thresholds": {"bad name": 0.9}},
    {"namespace_ttl_s": {"news": -5}},
    {"min_request_threshold": 0.99, "similarity_threshold": 0.9},
    {"similarity_threshold": 0},
    {"unknown_knob": 1},
])
def test_invalid_settings_are_rejected(bad):
    with pytest.raises(ValidationError):
        CacheSettings.model_validate(bad)
