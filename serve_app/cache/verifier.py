"""The pair verifier: a learned yes/no on "is the cached answer right for this query?".

Cosine similarity alone cannot tell a paraphrase from a related but different question
at the same score, and the threshold that keeps false hits at 2% misses most paraphrases
(benchmarks/results/cache_calibration.json). The verifier looks at the few nearest
candidates that pass the guard (serve_app/cache/guard.py, which stays a veto) and scores
each pair from cheap features of the two texts and their cosine; a candidate is served
when its score reaches the cutoff. Trained by `python -m training.train_cache_verifier`
on ../shared/data/cache only, and measured by group cross-validation
(benchmarks/cache_verifier.py).

Features (FEATURE_NAMES, all symmetric in the two texts): the cosine; content-word
(non-stopword stems) Jaccard, the smaller and the larger share of one text's content
words found in the other, the words only one side has (more and fewer); length ratio
and the longer length; character-trigram and word-bigram Jaccard; how many numbers and
names (guard.py's entities) one side has and the other lacks.

Model file (JSON, no pickle: loading runs no code), written by the trainer:

    {"format": "llmstack.cache.verifier", "format_version": 1,
     "model_version": "verifier-v1+<data hash prefix>", "kind": "gradient_boosted_trees",
     "input": {"features_version": 1, "feature_names": [...], "embedding_model": ...},
     "decision": {"min_similarity": 0.8, "cutoff": 0.87, "target_false_hit_rate": 0.02,
                  "meets_target": true},
     "trees": {"baseline": b, "roots": [...], "feature": [...], "threshold": [...],
               "left": [...], "right": [...], "value": [...]},   # one flat node array
     "metrics": {...cross-validated...}, "training": {...data fingerprint...}}

A node with feature -1 is a leaf holding `value`; otherwise x[feature] <= threshold goes
left. Every child comes after its parent, so the walk ends. score = sigmoid(baseline +
sum of the leaves reached). All trees are walked at once in numpy: tens of microseconds
for a few candidates.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from serve_app.cache.guard import STOPWORDS, TextFeatures, analyze, entity_present
from serve_app.cache.policy import normalize_prompt

MODEL_FORMAT = "llmstack.cache.verifier"
FORMAT_VERSION = 1
FEATURES_VERSION = 1
FEATURE_NAMES = (
    "similarity", "content_jaccard", "coverage_min", "coverage_max", "extra_words_max",
    "extra_words_min", "length_log_ratio", "log_length_max", "char_trigram_jaccard",
    "word_bigram_jaccard", "number_difference", "entity_difference",
)


class VerifierFileError(ValueError):
    """The verifier file is missing, of another format or version, or inconsistent."""


# ---- features ---------------------------------------------------------------------------

class _TextView(NamedTuple):
    features: TextFeatures
    content: frozenset[str]
    bigrams: frozenset[tuple[str, str]]
    trigrams: frozenset[str]


@lru_cache(maxsize=8192)
def _view(text: str) -> _TextView:
    """A text's parts the features compare; memoised, as cached prompts recur."""
    features = analyze(text)
    padded = f" {normalize_prompt(text)} "
    return _TextView(features, features.stems - STOPWORDS,
                     frozenset(zip(features.sequence, features.sequence[1:])),
                     frozenset(padded[i:i + 3] for i in range(len(padded) - 2)))


def pair_features(query: str, cached: str, similarity: float) -> list[float]:
    """The FEATURE_NAMES values of one (query, cached prompt) pair."""
    a, b = _view(query), _view(cached)
    shared = len(a.content & b.content)
    cover_a = shared / max(1, len(a.content))
    cover_b = shared / max(1, len(b.content))
    only_a, only_b = len(a.content - b.content), len(b.content - a.content)
    length_a, length_b = max(1, a.features.length), max(1, b.features.length)
    numbers_a, numbers_b = Counter(a.features.numbers), Counter(b.features.numbers)
    number_difference = sum(((numbers_a - numbers_b) + (numbers_b - numbers_a)).values())
    entity_difference = (
        sum(not entity_present(e, b.features) for e in a.features.entities)
        + sum(not entity_present(e, a.features) for e in b.features.entities))
    return [
        float(similarity),
        shared / max(1, len(a.content | b.content)),
        min(cover_a, cover_b),
        max(cover_a, cover_b),
        math.log1p(max(only_a, only_b)),
        math.log1p(min(only_a, only_b)),
        abs(math.log(length_a / length_b)),
        math.log(max(length_a, length_b)),
        _jaccard(a.trigrams, b.trigrams),
        _jaccard(a.bigrams, b.bigrams),
        math.log1p(number_difference),
        math.log1p(entity_difference),
    ]


def _jaccard(a: frozenset[Any], b: frozenset[Any]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


# ---- the model --------------------------------------------------------------------------

@dataclass(frozen=True)
class TreeEnsemble:
    """Gradient-boosted regression trees over one flat node array."""

    baseline: float
    roots: np.ndarray      # (trees,) node index of each root
    feature: np.ndarray    # (nodes,) feature index, -1 for a leaf
    threshold: np.ndarray  # (nodes,)
    left: np.ndarray       # (nodes,) child index, -1 for a leaf
    right: np.ndarray
    value: np.ndarray      # (nodes,) a leaf's contribution
    depth: int             # the longest root-to-leaf path, in edges

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], width: int) -> "TreeEnsemble":
        try:
            roots = np.asarray(spec["roots"], dtype=np.int64)
            feature = np.asarray(spec["feature"], dtype=np.int64)
            threshold = np.asarray(spec["threshold"], dtype=np.float64)
            left = np.asarray(spec["left"], dtype=np.int64)
            right = np.asarray(spec["right"], dtype=np.int64)
            value = np.asarray(spec["value"], dtype=np.float64)
            baseline = float(spec["baseline"])
        except (KeyError, TypeError, ValueError) as exc:
            raise VerifierFileError(f"trees: {exc}") from exc
        nodes = feature.shape[0]
        if not (roots.ndim == feature.ndim == threshold.ndim == left.ndim == right.ndim
                == value.ndim == 1) or nodes == 0 or roots.shape[0] == 0:
            raise VerifierFileError("trees: roots and node arrays must be non-empty lists")
        if not threshold.shape == left.shape == right.shape == value.shape == (nodes,):
            raise VerifierFileError("trees: every node array must have one entry per node")
        if not (np.all(np.isfinite(threshold)) and np.all(np.isfinite(value))
                and math.isfinite(baseline)):
            raise VerifierFileError("trees: thresholds, values and baseline must be finite")
        if np.any((roots < 0) | (roots >= nodes)) or np.any(feature >= width) \
                or np.any(feature < -1):
            raise VerifierFileError("trees: a root or a feature index is out of range")
        inner = feature >= 0
        index = np.arange(nodes)
        for child in (left, right):
            if np.any(inner & ((child <= index) | (child >= nodes))):
                raise VerifierFileError("trees: every child must come after its parent")
            if np.any(~inner & (child != -1)):
                raise VerifierFileError("trees: a leaf must have no children")
        depth = np.zeros(nodes, dtype=np.int64)
        for node in range(nodes):  # children come later, so one pass sets every depth
            if inner[node]:
                depth[left[node]] = depth[right[node]] = depth[node] + 1
        return cls(baseline, roots, feature, threshold, left, right, value,
                   int(depth.max()))

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "roots": self.roots.tolist(),
                "feature": self.feature.tolist(), "threshold": self.threshold.tolist(),
                "left": self.left.tolist(), "right": self.right.tolist(),
                "value": self.value.tolist()}

    def raw(self, x: np.ndarray) -> np.ndarray:
        """(n, width) -> (n,) log-odds: every tree walked at once."""
        rows = np.arange(x.shape[0])[:, None]
        node = np.broadcast_to(self.roots, (x.shape[0], self.roots.shape[0])).copy()
        for _ in range(self.depth):
            feature = self.feature[node]
            inner = feature >= 0
            if not inner.any():
                break
            values = x[rows, np.where(inner, feature, 0)]
            step = np.where(values <= self.threshold[node], self.left[node], self.right[node])
            node = np.where(inner, step, node)
        return self.baseline + self.value[node].sum(axis=1)


@dataclass
class VerifierModel:
    version: str
    min_similarity: float  # candidates below this cosine are never scored (nor served)
    cutoff: float          # a score at or above it serves the candidate
    trees: TreeEnsemble
    meets_target: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "VerifierModel":
        path = Path(path)
        if not path.is_file():
            raise VerifierFileError(f"cache verifier file {path} does not exist; train it "
                                    f"with `python -m training.train_cache_verifier --out "
                                    f"{path}` or set cache.verifier: false")
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise VerifierFileError(f"cache verifier file {path} is not valid JSON: "
                                    f"{exc}") from exc
        return cls.from_dict(payload)

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> "VerifierModel":
        if payload.get("format") != MODEL_FORMAT:
            raise VerifierFileError(f"not a cache verifier file (format="
                                    f"{payload.get('format')!r})")
        if payload.get("format_version") != FORMAT_VERSION:
            raise VerifierFileError(f"cache verifier format_version "
                                    f"{payload.get('format_version')} is not supported "
                                    f"(expected {FORMAT_VERSION}); retrain it")
        spec = payload.get("input") or {}
        if spec.get("features_version") != FEATURES_VERSION or \
                tuple(spec.get("feature_names", ())) != FEATURE_NAMES:
            raise VerifierFileError("the verifier was trained on other features; retrain it")
        decision = payload.get("decision") or {}
        try:
            min_similarity = float(decision["min_similarity"])
            cutoff = float(decision["cutoff"])
        except (KeyError, TypeError, ValueError) as exc:
            raise VerifierFileError(f"decision: {exc}") from exc
        if not 0 < min_similarity <= 1 or not 0 <= cutoff <= 1:
            raise VerifierFileError("decision: min_similarity must be in (0, 1] and cutoff "
                                    "in [0, 1]")
        return cls(version=str(payload.get("model_version", "")),
                   min_similarity=min_similarity, cutoff=cutoff,
                   trees=TreeEnsemble.from_dict(payload.get("trees") or {},
                                                len(FEATURE_NAMES)),
                   meets_target=bool(decision.get("meets_target", False)),
                   metrics=dict(payload.get("metrics") or {}),
                   training=dict(payload.get("training") or {}))

    def scores(self, query: str, candidates: Sequence[tuple[str, float]]) -> list[float]:
        """Scores in [0, 1] of (cached prompt, cosine) candidates for one query."""
        if not candidates:
            return []
        x = np.array([pair_features(query, prompt, similarity)
                      for prompt, similarity in candidates], dtype=np.float64)
        return (1.0 / (1.0 + np.exp(-self.trees.raw(x)))).tolist()


@dataclass(frozen=True)
class VerifierGate:
    """The verifier as the lookup uses it: score the first `candidates` guard-passing
    candidates, serve the best one if it reaches `cutoff`."""

    model: VerifierModel
    cutoff: float
    candidates: int = 3

    @property
    def min_similarity(self) -> float:
        return self.model.min_similarity

    def pick(self, query: str, candidates: Sequence[tuple[str, float]]
             ) -> tuple[int | None, float | None]:
        """-> (index of the candidate to serve or None, the best score)."""
        scores = self.model.scores(query, candidates)
        if not scores:
            return None, None
        best = max(range(len(scores)), key=scores.__getitem__)
        return (best if scores[best] >= self.cutoff else None), scores[best]
