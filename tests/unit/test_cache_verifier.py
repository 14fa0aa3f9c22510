"""The pair verifier (no Ray): its features, the model file's checks, tree inference, the
shipped model's decisions, and how a lookup uses it."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from serve_app.cache.config import CacheSettings
from serve_app.cache.service import CacheService
from serve_app.cache.store import CacheEntry, CacheStore
from serve_app.cache.verifier import (
    FEATURE_NAMES,
    TreeEnsemble,
    VerifierFileError,
    VerifierGate,
    VerifierModel,
    pair_features,
)
from serve_app.settings import PROJECT_ROOT
from tests.unit.test_cache_service import Clock, completion, decide, near, vector

SHIPPED = PROJECT_ROOT / "models" / "cache" / "verifier-v1.json"


def features(query, cached, similarity=0.9):
    return dict(zip(FEATURE_NAMES, pair_features(query, cached, similarity)))


def stump_model(cutoff=0.5, split=0.9, low=-3.0, high=3.0, min_similarity=0.8):
    """One tree: similarity <= split -> sigmoid(low), else sigmoid(high)."""
    return {"format": "llmstack.cache.verifier", "format_version": 1,
            "model_version": "test", "input": {"features_version": 1,
                                               "feature_names": list(FEATURE_NAMES)},
            "decision": {"min_similarity": min_similarity, "cutoff": cutoff},
            "trees": {"baseline": 0.0, "roots": [0], "feature": [0, -1, -1],
                      "threshold": [split, 0.0, 0.0], "left": [1, -1, -1],
                      "right": [2, -1, -1], "value": [0.0, low, high]}}


# ---- features ------------------------------------------------------------------------

def test_features_are_symmetric_and_see_what_differs():
    a, b = "How do I reverse a list in Python 3?", "What is the way to reverse a Python list?"
    assert pair_features(a, b, 0.9) == pair_features(b, a, 0.9)
    same = features("Name a primary colour.", "Name a primary color.")
    assert same["content_jaccard"] == 1.0 and same["extra_words_max"] == 0.0
    assert same["number_difference"] == 0.0 and same["entity_difference"] == 0.0
    other = features("How many moons does Mars have?", "How many moons does Jupiter have?")
    assert other["entity_difference"] > 0 and other["content_jaccard"] < 1.0
    numbers = features("Is 7 a prime?", "Is 9 a prime?")
    assert numbers["number_difference"] == pytest.approx(np.log1p(2))
    longer = features("Get rid of fleas", "How can I get rid of fleas in my crawlspace forever?")
    assert longer["length_log_ratio"] > 0.5 and longer["coverage_max"] == 1.0
    assert longer["coverage_min"] == pytest.approx(3 / 5)  # get, rid, flea of 5


# ---- the model file ------------------------------------------------------------------

def test_tree_inference_walks_every_tree():
    model = VerifierModel.from_dict(stump_model())
    low, high = model.scores("q", [("c", 0.85), ("c", 0.95)])
    assert low == pytest.approx(1 / (1 + np.exp(3))) and high == pytest.approx(1 / (1 + np.exp(-3)))
    two = stump_model()
    trees = two["trees"]
    trees.update(roots=[0, 3], feature=trees["feature"] + [0, -1, -1],
                 threshold=trees["threshold"] + [0.5, 0.0, 0.0],
                 left=trees["left"] + [4, -1, -1], right=trees["right"] + [5, -1, -1],
                 value=trees["value"] + [0.0, -1.0, 1.0])
    assert VerifierModel.from_dict(two).scores("q", [("c", 0.95)])[0] == \
        pytest.approx(1 / (1 + np.exp(-4)))


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(format="other"), "not a cache verifier"),
    (lambda m: m.update(format_version=2), "format_version"),
    (lambda m: m["input"].update(feature_names=["similarity"]), "other features"),
    (lambda m: m["decision"].update(cutoff=1.5), "cutoff"),
    (lambda m: m["trees"].update(left=[0, -1, -1]), "after its parent"),
    (lambda m: m["trees"].update(feature=[99, -1, -1]), "out of range"),
    (lambda m: m["trees"].update(value=[0.0, float("nan"), 1.0]), "finite"),
    (lambda m: m["trees"].update(right=[2, 2, -1]), "no children"),
    (lambda m: m["trees"].pop("roots"), "trees"),
])
def test_bad_model_files_are_refused(change, message):
    payload = copy.deepcopy(stump_model())
    change(payload)
    with pytest.raises(VerifierFileError, match=message):
        VerifierModel.from_dict(payload)


def test_a_missing_file_names_the_training_command(tmp_path):
    with pytest.raises(VerifierFileError, match="train_cache_verifier"):
        VerifierModel.load(tmp_path / "none.json")


def test_the_shipped_model_loads_met_its_target_and_records_its_data():
    payload = json.loads(SHIPPED.read_text())
    model = VerifierModel.from_dict(payload)
    assert model.meets_target and model.min_similarity == 0.8
    assert model.metrics["verifier"]["recall"] >= 0.40
    assert max(model.metrics["verifier"]["false_hit_rate_natural"],
               model.metrics["verifier"]["false_hit_rate_synthetic"]) <= 0.02
    assert model.metrics["verifier"]["recall"] > model.metrics["guard"]["recall"]
    assert len(model.training["data"]["sha256"]) == 64
    assert isinstance(TreeEnsemble.from_dict(payload["trees"], len(FEATURE_NAMES)), TreeEnsemble)


@pytest.mark.parametrize("query, cached, similarity, serve", [
    ("Name a primary colour.", "Name a primary color.", 0.984, True),
    ("How do I reverse a list in Python?", "What is the way to reverse a Python list?",
     0.972, True),
    ("What is the capital of France?", "Which city is the capital of France?", 0.942, True),
    ("How do I cancel my subscription?", "How do I pause my subscription?", 0.81, False),
    ("How do I sort a list in Python?", "How do I reverse a list in Python?", 0.82, False),
])
def test_the_shipped_model_decides_plain_cases(query, cached, similarity, serve):
    """Cosines as all-MiniLM-L6-v2 gives them (the last two raised to the 0.8 floor)."""
    model = VerifierModel.load(SHIPPED)
    assert (model.scores(query, [(cached, similarity)])[0] >= model.cutoff) is serve


# ---- in the lookup -------------------------------------------------------------------



def test_the_lookup_scores_the_first_guard_passing_candidates_and_serves_the_best(tmp_path):
    store = CacheStore(tmp_path / "t", dim=384)
    base = vector(1)
    prompts = {"a": 0.97, "b": 0.95, "c": 0.93, "d": 0.91}
    for prompt, similarity in prompts.items():
        store.add([CacheEntry(tenant="t", scope_key="s", prompt_hash=prompt, prompt=prompt,
                              vector=np.asarray(near(base, similarity, ord(prompt))),
                              answer=json.dumps(completion(prompt)), model="m",
                              created_at=0.0)])
    seen: list[list[str]] = []

    class Model:
        min_similarity = 0.8

        def scores(self, query, candidates):
            seen.append([prompt for prompt, _ in candidates])
            return [{"a": 0.2, "b": 0.9, "c": 0.7}.get(p, 0.0) for p, _ in candidates]

    gate = VerifierGate(Model(), cutoff=0.6, candidates=3)  # type: ignore[arg-type]
    outcome = store.lookup(tenant="t", scope_key="s", prompt_hash="q", vector=base,
                           threshold=0.8, now=1.0, query_text="q", verifier=gate)
    assert seen == [["a", "b", "c"]]  # nearest first, three of them
    assert outcome.hit is not None and outcome.hit.prompt == "b"
    assert outcome.hit.verifier_score == 0.9
    strict = VerifierGate(Model(), cutoff=0.95, candidates=3)  # type: ignore[arg-type]
    refused = store.lookup(tenant="t", scope_key="s", prompt_hash="q", vector=base,
                           threshold=0.8, now=1.0, query_text="q", verifier=strict)
    assert refused.hit is None and refused.rejected == "verifier"
    assert refused.verifier_score == 0.9


def test_the_service_floor_with_the_verifier(tmp_path):
    service = CacheService(CacheSettings(namespace_thresholds={"strict": 0.97}),
                           tmp_path / "c", clock=Clock())
    assert service.verifier is not None and service.verifier.candidates == 3
    plain = type("Plan", (), {"threshold": None, "namespace": "default"})()
    assert service.floor("acme", plain) == 0.8  # the verifier's floor, not 0.925
    strict = type("Plan", (), {"threshold": None, "namespace": "strict"})()
    assert service.floor("acme", strict) == 0.97
    asked = type("Plan", (), {"threshold": 0.6, "namespace": "default"})()
    assert service.floor("acme", asked) == 0.8  # never below what it was trained on
    no_guard = CacheService(CacheSettings(guard=False), tmp_path / "d", clock=Clock())
    assert no_guard.verifier is None  # the verifier scores guard-passing pairs only
    assert service.stats()["verifier"]["model_version"].startswith("verifier-v1+")


def test_a_verifier_miss_is_reported_with_its_score(tmp_path):
    service = CacheService(CacheSettings(verifier_cutoff=1.0), tmp_path / "c", clock=Clock())
    base = vector(3)
    service.store_answer("acme", decide(prompt="How do I cancel my subscription?"), base,
                         completion())
    result = service.lookup("acme", decide(prompt="How do I pause my subscription?"),
                            near(base, 0.9, 4))
    assert result["hit"] is False and result["reason"] == "verifier"
    assert 0 <= result["verifier_score"] < 1
