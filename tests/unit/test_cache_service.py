"""CacheService (what the SemanticCache deployment wraps) with a real LanceDB table and a
controlled clock; plus the replay helpers the gateway uses to answer from the cache."""
import numpy as np
import pytest

from serve_app.cache.config import CacheSettings
from serve_app.cache.policy import plan_cache
from serve_app.cache.replay import (cached_completion, completion_chunks,
                                    completion_from_chunks, estimated_saving_usd, is_storable)
from serve_app.cache.service import CacheService
from serve_app.errors import ApiError

DIM = 384


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class RecordingMetrics:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def hit(self, match, similarity, namespace):
        self.events.append(("hit", match, namespace))

    def miss(self, reason, namespace):
        self.events.append(("miss", reason, namespace))

    def lookup_seconds(self, seconds):
        self.events.append(("latency",))

    def entries(self, count):
        self.events.append(("entries", count))

    def evicted(self, count, reason):
        self.events.append(("evicted", count, reason))

    def saved(self, usd, model):
        self.events.append(("saved", usd, model))


def completion(text="Paris.", model="smollm2-135m-instruct", **choice):
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop", **choice}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}


def body(prompt="What is the capital of France?", **extra):
    return {"model": "smollm2-135m-instruct", "temperature": 0,
            "messages": [{"role": "user", "content": prompt}], **extra}


def vector(seed: int) -> list[float]:
    values = np.random.default_rng(seed).normal(size=DIM)
    return (values / np.linalg.norm(values)).tolist()


def near(base: list[float], similarity: float, seed: int) -> list[float]:
    base_array = np.asarray(base)
    noise = np.random.default_rng(seed).normal(size=DIM)
    noise -= noise.dot(base_array) * base_array
    noise /= np.linalg.norm(noise)
    return (similarity * base_array + np.sqrt(1 - similarity**2) * noise).tolist()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def metrics():
    return RecordingMetrics()


def make_service(tmp_path, clock, metrics=None, **settings):
    return CacheService(CacheSettings(**settings), tmp_path / "cache", metrics=metrics,
                        clock=clock)


def decide(settings=CacheSettings(), headers=None, **kwargs):
    return plan_cache(body(**kwargs), headers, settings).to_dict()


def test_store_then_paraphrase_lookup_hits(tmp_path, clock, metrics):
    service = make_service(tmp_path, clock, metrics)
    cached_vector = vector(1)
    stored = service.store_answer("acme", decide(), cached_vector, completion(),
                                  source_ids=["doc:1@1"], tier="small")
    assert stored["stored"] is True and stored["expires_at"] == clock.now + 86_400
    paraphrase = decide(prompt="Which city is the capital of France?")
    result = service.lookup("acme", paraphrase, near(cached_vector, 0.95, 2))
    assert result["hit"] is True and result["match"] == "semantic"
    assert result["similarity"] == pytest.approx(0.95, abs=1e-3)
    assert result["completion"]["choices"][0]["message"]["content"] == "Paris."
    assert result["usage"]["completion_tokens"] == 3
    assert (result["tier"], result["source_ids"]) == ("small", ["doc:1@1", "doc:1"])
    assert ("hit", "semantic", "default") in metrics.events
    assert service.stats()["hits"] == 1


def test_guard_blocks_a_reversed_question_with_a_near_identical_vector(tmp_path, clock):
    service = make_service(tmp_path, clock)
    cached_vector = vector(3)
    service.store_answer("acme", decide(prompt="Is Python faster than Java?"), cached_vector,
                         completion("Usually, yes."))
    reversed_question = decide(prompt="Is Java faster than Python?")
    result = service.lookup("acme", reversed_question, near(cached_vector, 0.99, 4))
    assert result["hit"] is False and result["reason"] == "guard:word_order"
    no_guard = make_service(tmp_path / "b", clock, guard=False)
    no_guard.store_answer("acme", decide(prompt="Is Python faster than Java?"), cached_vector,
                          completion("Usually, yes."))
    assert no_guard.lookup("acme", reversed_question, near(cached_vector, 0.99, 4))["hit"]


def test_other_tenants_miss(tmp_path, clock):
    service = make_service(tmp_path, clock)
    service.store_answer("acme", decide(), vector(5), completion())
    assert service.lookup("globex", decide(), vector(5))["hit"] is False
    assert service.lookup("acme", decide(), vector(5))["match"] == "exact"


def test_policy_controls_reach_the_service(tmp_path, clock, metrics):
    service = make_service(tmp_path, clock, metrics)
    sampled = plan_cache(body(temperature=0.9), None, CacheSettings()).to_dict()
    skipped = service.lookup("acme", sampled, vector(6))
    assert (skipped["hit"], skipped["reason"]) == (False, "skipped:temperature")
    assert service.store_answer("acme", sampled, vector(6), completion())["stored"] is False
    no_store = decide(headers={"Cache-Control": "no-store"})
    assert service.store_answer("acme", no_store, vector(6), completion()) == {
        "stored": False, "reason": "no_store"}
    service.store_answer("acme", decide(), vector(6), completion())
    no_cache = decide(cache={"no_cache": True})
    assert service.lookup("acme", no_cache, vector(6))["reason"] == "skipped:no_cache"


def test_only_plain_text_answers_are_stored(tmp_path, clock):
    service = make_service(tmp_path, clock)
    tool_call = completion(text="")
    tool_call["choices"][0]["message"]["tool_calls"] = [{"id": "1", "type": "function",
                                                        "function": {"name": "f",
                                                                     "arguments": "{}"}}]
    for bad in (tool_call, {"error": {"message": "boom"}}, completion(text="")):
        assert service.store_answer("acme", decide(), vector(7), bad)["stored"] is False


def test_ttls_per_request_and_per_namespace(tmp_path, clock):
    service = make_service(tmp_path, clock, namespace_ttl_s={"news": 60})
    service.store_answer("acme", decide(cache={"ttl": 10}), vector(8), completion())
    news = decide(prompt="Latest headlines?", cache={"namespace": "news"})
    service.store_answer("acme", news, vector(9), completion("Nothing new."))
    clock.now += 30
    assert service.lookup("acme", decide(), vector(8))["hit"] is False
    assert service.lookup("acme", news, vector(9))["hit"] is True
    clock.now += 31
    assert service.lookup("acme", news, vector(9))["hit"] is False
    assert service.maintain()["expired"] == 2


def test_per_namespace_and_per_request_thresholds(tmp_path, clock):
    """Guard only: the request's threshold, else the namespace's, else the default."""
    service = make_service(tmp_path, clock, namespace_thresholds={"loose": 0.8},
                           verifier=False)
    loose = decide(cache={"namespace": "loose"})
    service.store_answer("acme", loose, vector(10), completion())
    query = decide(prompt="Capital of France, please", cache={"namespace": "loose"})
    assert service.lookup("acme", query, near(vector(10), 0.85, 11))["hit"] is True
    strict = decide(prompt="Capital of France, please",
                    cache={"namespace": "loose", "threshold": 0.9})
    assert service.lookup("acme", strict, near(vector(10), 0.85, 11))["hit"] is False


def test_maintenance_evicts_beyond_the_size_cap(tmp_path, clock, metrics):
    service = make_service(tmp_path, clock, metrics, max_entries=5, evict_to_fraction=0.6)
    for i in range(8):
        clock.now += 1
        service.store_answer("acme", decide(prompt=f"question number {i}"), vector(20 + i),
                             completion())
    result = service.maintain()
    assert result["evicted"] == 5 and result["entries"] == 3
    assert ("evicted", 5, "size") in metrics.events


def test_invalidate_validates_kind_and_value(tmp_path, clock):
    service = make_service(tmp_path, clock)
    service.store_answer("acme", decide(), vector(30), completion(), source_ids=["doc:5@1"])
    service.store_answer("acme", decide(prompt="Other question?"), vector(31), completion(),
                         source_ids=["doc:5@2"])
    assert service.invalidate("source", "doc:5@1")["deleted"] == 1  # one version
    assert service.invalidate("source", "doc:5")["deleted"] == 1  # every version left
    for kind, value in (("colour", "red"), ("tenant", None)):
        with pytest.raises(ApiError) as caught:
            service.invalidate(kind, value)
        assert caught.value.status == 422


def test_bad_calls_are_api_errors(tmp_path, clock):
    service = make_service(tmp_path, clock)
    with pytest.raises(ApiError):
        service.lookup("", decide(), vector(1))
    with pytest.raises(ApiError):
        service.lookup("acme", decide(), [1.0, 2.0])
    with pytest.raises(ApiError):
        service.store_answer("acme", decide(), None, completion())
    with pytest.raises(ApiError):
        service.store_answer("acme", decide(), vector(1), completion(), source_ids=[""])
    with pytest.raises(ApiError):
        service.record_saving(-1.0, "gpt")


def test_savings_are_recorded(tmp_path, clock, metrics):
    service = make_service(tmp_path, clock, metrics)
    saving = estimated_saving_usd({"prompt_tokens": 1000, "completion_tokens": 500}, 2.0, 8.0)
    assert saving == pytest.approx(0.006)
    assert service.record_saving(saving, "gpt-4o")["saved_usd_total"] == pytest.approx(0.006)
    assert ("saved", saving, "gpt-4o") in metrics.events


# ---- replay helpers -----------------------------------------------------------------------

def test_cached_completion_is_a_new_response_with_zero_usage():
    original = completion()
    served = cached_completion(original, now=42)
    assert served["id"] != original["id"] and served["created"] == 42
    assert served["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert served["choices"] == original["choices"]
    assert original["usage"]["total_tokens"] == 15  # not mutated


def test_stream_replay_round_trips():
    original = completion("The capital of France is Paris.")
    chunks = completion_chunks(original, include_usage=True, chunk_chars=8)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 0
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    rebuilt = completion_from_chunks(chunks)
    assert rebuilt["choices"][0]["message"]["content"] == "The capital of France is Paris."
    assert "usage" not in completion_chunks(original)[0]


def test_streams_with_tool_calls_or_errors_are_not_assembled():
    tool_chunk = {"id": "x", "choices": [{"index": 0, "delta": {"tool_calls": [{"id": "1"}]}}]}
    assert completion_from_chunks([tool_chunk]) is None
    assert completion_from_chunks([{"error": {"message": "boom"}}]) is None
    assert completion_from_chunks([]) is None


def test_is_storable():
    assert is_storable(completion())
    assert is_storable(completion(finish_reason="length"))
    assert not is_storable(completion(finish_reason="content_filter"))
    assert not is_storable({"choices": []})
