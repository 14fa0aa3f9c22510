"""Semantic cache settings (the `cache:` block of the stack's settings)."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Calibrated by `python -m benchmarks.cache_calibration` on ../shared/data/cache (seed 13):
# the lowest cosine threshold at which cosine + guard keeps the macro false-hit rate at or
# below 2% on the calibration half, for natural and for synthetic near-miss pairs alike.
# benchmarks/results/cache_calibration.json, "chosen" -> "guard", has its held-out
# precision, recall and false-hit rates. Without the guard no threshold meets the target.
CALIBRATED_THRESHOLD = 0.925
# Trained by `python -m training.train_cache_verifier` (models/cache/verifier-v1.json has its
# data fingerprint and cross-validated metrics): at <= 2% false hits it serves 47% of the
# repeated questions the guard alone serves 32% of.
DEFAULT_VERIFIER_FILE = "models/cache/verifier-v1.json"
SHIPPED_ROOT = Path(__file__).resolve().parents[2]
NAMESPACE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
DEFAULT_NAMESPACE = "default"
_NAMESPACE = re.compile(NAMESPACE_PATTERN)


class CacheFeedbackSettings(BaseModel):
    """How confirmed-wrong hits (POST /v1/cache/feedback) move a tenant's threshold in a
    namespace (serve_app/cache/feedback.py, `learned_threshold`)."""

    model_config = ConfigDict(extra="forbid")

    min_count: int = Field(
        3, ge=1, description="Distinct confirmed-wrong semantic hits a (tenant, namespace) "
        "needs before its threshold moves: one mistaken report moves nothing.")
    margin: float = Field(
        0.005, ge=0, le=0.1, description="The threshold rises this far above the "
        "similarity that `min_count` confirmed-wrong hits reached.")
    max_threshold: float = Field(
        0.98, gt=0, le=1, description="Feedback never raises a threshold above this (exact "
        "repeats still hit at any threshold).")
    served_retention_s: float = Field(
        7 * 86_400.0, gt=0, description="How long served hits are remembered by request id "
        "(x-llmstack-request-id), so they can be reported; older ones by entry id only.")


class CacheSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Off: every request is a miss and nothing is stored.")
    similarity_threshold: float = Field(
        CALIBRATED_THRESHOLD, gt=0, le=1,
        description="Cosine similarity a cached prompt needs to be served (guard on). "
        "Calibrated, see benchmarks/results/cache_calibration.json.")
    namespace_thresholds: dict[str, float] = Field(
        default_factory=dict, description="Per-namespace threshold overrides.")
    guard: bool = Field(
        True, description="Reject candidates that differ in negation, numbers, names, "
        "question type, antonyms or direction (serve_app/cache/guard.py). The default "
        "threshold was calibrated with the guard on; raise it when turning the guard off.")
    guard_short_text_tokens: int = Field(
        20, ge=1, description="Prompts up to this many words count as fully specified "
        "questions: one extra number or name already makes them different.")
    verifier: bool = Field(
        True, description="Score the nearest guard-passing candidates with the learned pair "
        "verifier (serve_app/cache/verifier.py) and serve one only when its score reaches "
        "the cutoff; candidates need the verifier's own minimum similarity (0.80) instead of "
        "similarity_threshold. Needs the guard (with guard off the plain threshold decides). "
        "On because it meets the target: models/cache/verifier-v1.json, 'metrics'.")
    verifier_model: Path = Field(
        Path(DEFAULT_VERIFIER_FILE), description="File written by `python -m "
        "training.train_cache_verifier`. A relative path is looked up under data_dir first, "
        "then in the repository, which ships the default.")
    verifier_cutoff: float | None = Field(
        None, ge=0, le=1, description="Override the file's cutoff (higher: fewer and safer "
        "hits).")
    verifier_candidates: int = Field(
        3, ge=1, le=100, description="Guard-passing candidates, nearest first, the verifier "
        "scores per lookup; the best-scoring one is served if it reaches the cutoff.")
    feedback: CacheFeedbackSettings = CacheFeedbackSettings()
    default_ttl_s: float | None = Field(
        86_400.0, gt=0, description="Entry lifetime; null: entries never expire.")
    namespace_ttl_s: dict[str, float | None] = Field(
        default_factory=dict, description="Per-namespace lifetimes (null: never expire).")
    max_ttl_s: float = Field(
        30 * 86_400.0, gt=0, description="Upper bound for a per-request `cache.ttl`.")
    min_request_threshold: float = Field(
        0.5, gt=0, le=1, description="Lowest `cache.threshold` a request may ask for.")
    unset_temperature: Literal["cache", "sampled"] = Field(
        "cache", description="A request that sets no temperature (the OpenAI SDK's default, "
        "so most FAQ and support clients): 'cache' treats it as cacheable, since the client "
        "asked for no variety and a stored answer is one sample of what the model says; "
        "'sampled' treats it as OpenAI's 1.0 (cached only where allow_temperature or the "
        "key's cache_sampled allows).")
    allow_temperature: bool = Field(
        False, description="Cache requests sampled with temperature > 0 (an unset "
        "temperature means 1.0) for every key. Keys can also opt in one by one.")
    semantic_max_chars: int = Field(
        1_000, ge=1, description="Longer prompts are matched exactly only: the embedding "
        "model reads 256 word pieces, so two long prompts that differ at the end would "
        "embed alike.")
    max_entries: int = Field(100_000, ge=1, description="Size cap; least recently hit "
                             "entries are evicted beyond it.")
    memory_index: bool = Field(
        True, description="Lookups read an in-memory mirror of the table (vectors and "
        "answers, bounded by max_entries: ~1.5 KB plus the answer per entry) instead of "
        "querying LanceDB (20-100 ms per filtered query here); the table stays the durable "
        "copy and rebuilds the mirror at start. Off: every lookup queries LanceDB.")
    evict_to_fraction: float = Field(
        0.9, gt=0, le=1, description="Eviction shrinks the table to this share of max_entries.")
    insert_batch_size: int = Field(64, ge=1, description="Buffered inserts per LanceDB write.")
    flush_interval_s: float = Field(0.5, gt=0, description="Pending inserts and hit "
                                    "counts are written at least this often.")
    maintenance_interval_s: float = Field(
        30.0, gt=0, description="Expiry, eviction, compaction and indexing run this often.")
    compact_after_fragments: int = Field(
        16, ge=2, description="Compact the table once it has this many data fragments.")
    index_build_threshold: int = Field(
        10_000, ge=256, description="Build the vector index once the table holds this many "
        "rows (benchmarks/results/cache_store_latency.json).")
    index_type: Literal["IVF_FLAT", "IVF_HNSW_SQ"] = Field(
        "IVF_FLAT", description="Vector index type. IVF_FLAT builds in seconds; "
        "IVF_HNSW_SQ searches large tables faster but takes minutes to build on CPUs. "
        "(IVF_PQ is not offered: its coarse scores blur the threshold.)")
    search_candidates: int = Field(
        8, ge=1, le=100, description="Nearest entries the guard may look at per lookup.")
    uri: str | None = Field(
        None, description="LanceDB URI (directory or object store). Empty: "
        "<data_dir>/semantic_cache.")
    table_name: str = Field("entries", min_length=1)
    embedding_dim: int = Field(384, ge=1, description="Vector size of the Embedder.")
    cleanup_older_than_s: float = Field(
        300.0, ge=0, description="Old table versions are pruned after this age.")

    @field_validator("namespace_thresholds")
    @classmethod
    def _thresholds_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        for name, threshold in value.items():
            _check_namespace(name)
            if not 0 < threshold <= 1:
                raise ValueError(f"namespace_thresholds[{name!r}] must be in (0, 1]")
        return value

    @field_validator("namespace_ttl_s")
    @classmethod
    def _ttls_positive(cls, value: dict[str, float | None]) -> dict[str, float | None]:
        for name, ttl in value.items():
            _check_namespace(name)
            if ttl is not None and not (ttl > 0 and math.isfinite(ttl)):
                raise ValueError(f"namespace_ttl_s[{name!r}] must be > 0 or null")
        return value

    @model_validator(mode="after")
    def _request_threshold_below_default(self) -> "CacheSettings":
        if self.min_request_threshold > self.similarity_threshold:
            raise ValueError("min_request_threshold must not exceed similarity_threshold")
        return self

    def threshold_for(self, namespace: str) -> float:
        return self.namespace_thresholds.get(namespace, self.similarity_threshold)

    @property
    def uses_verifier(self) -> bool:
        return self.verifier and self.guard

    def verifier_path(self, data_dir: Path | str | None) -> Path:
        path = self.verifier_model
        if path.is_absolute():
            return path
        shipped = SHIPPED_ROOT / path
        if data_dir is None:
            return shipped
        trained_here = Path(data_dir) / path
        return trained_here if trained_here.is_file() or not shipped.is_file() else shipped

    def ttl_for(self, namespace: str) -> float | None:
        if namespace in self.namespace_ttl_s:
            return self.namespace_ttl_s[namespace]
        return self.default_ttl_s


def _check_namespace(name: str) -> None:
    if not _NAMESPACE.match(name):
        raise ValueError(f"namespace {name!r} must match {NAMESPACE_PATTERN}")
