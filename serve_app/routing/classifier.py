"""The complexity classifier: a versioned model file -> score in [0, 1] and a tier.

Model file (JSON, no pickle: loading it runs no code). Written by training/train_router.py:

    {"format": "llmstack.router.complexity", "format_version": 1,
     "model_version": "complexity-v1+<data hash prefix>",
     "kind": "logistic" | "mlp",
     "input": {"embedding_model": "all-MiniLM-L6-v2", "embedding_dim": 384,
               "features_version": 1, "feature_names": [...]},
     "scaler": {"mean": [...], "scale": [...]},          # over [embedding, features]
     "layers": [{"weights": [[...]], "bias": [...], "activation": "relu" | "sigmoid"}],
     "default_thresholds": {"small_below": x, "large_from": y},
     "calibration": {"scores": [...], "medium_correct": [...], "large_correct": [...],
                     "tokens_in": [...]},                 # held-out validation rows
     "metrics": {...}, "training": {...}}

Inference is a few small matrix products in numpy: tens of microseconds after the
embedding, which the Embedder computes once per request for the cache and the router.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serve_app.routing.features import FEATURE_NAMES, FEATURES_VERSION, batch_features
from serve_app.routing.policy import Thresholds

logger = logging.getLogger(__name__)

MODEL_FORMAT = "llmstack.router.complexity"
FORMAT_VERSION = 1
ACTIVATIONS = ("relu", "sigmoid")


class ModelFileError(ValueError):
    """The model file is missing, of another format/version, or inconsistent."""


@dataclass
class Layer:
    weights: np.ndarray  # (in, out)
    bias: np.ndarray     # (out,)
    activation: str


@dataclass
class ComplexityModel:
    version: str
    kind: str
    embedding_dim: int
    mean: np.ndarray
    scale: np.ndarray
    layers: list[Layer]
    default_thresholds: Thresholds
    calibration: dict[str, list[float]] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path) -> "ComplexityModel":
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"router model file {path} does not exist; train it with "
                                 f"`python -m training.train_router --out {path}`")
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelFileError(f"router model file {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(payload)

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> "ComplexityModel":
        if payload.get("format") != MODEL_FORMAT:
            raise ModelFileError(f"not a router model file (format={payload.get('format')!r})")
        if payload.get("format_version") != FORMAT_VERSION:
            raise ModelFileError(f"router model format_version {payload.get('format_version')}"
                                 f" is not supported (expected {FORMAT_VERSION}); retrain it")
        spec = payload["input"]
        if spec.get("features_version") != FEATURES_VERSION or \
                tuple(spec.get("feature_names", ())) != FEATURE_NAMES:
            raise ModelFileError("the model file was trained with other text features; retrain")
        dim = int(spec["embedding_dim"])
        width = dim + len(FEATURE_NAMES)
        mean = np.asarray(payload["scaler"]["mean"], dtype=np.float32)
        scale = np.asarray(payload["scaler"]["scale"], dtype=np.float32)
        if mean.shape != (width,) or scale.shape != (width,) or np.any(scale <= 0):
            raise ModelFileError(f"scaler must have {width} entries with positive scales")
        layers = []
        fan_in = width
        for index, spec_layer in enumerate(payload["layers"]):
            weights = np.asarray(spec_layer["weights"], dtype=np.float32)
            bias = np.asarray(spec_layer["bias"], dtype=np.float32)
            activation = spec_layer["activation"]
            if weights.ndim != 2 or weights.shape[0] != fan_in or bias.shape != (weights.shape[1],):
                raise ModelFileError(f"layer {index} has shape {weights.shape}/{bias.shape}, "
                                     f"expected ({fan_in}, n)/(n,)")
            if activation not in ACTIVATIONS:
                raise ModelFileError(f"layer {index}: unknown activation {activation!r}")
            layers.append(Layer(weights, bias, activation))
            fan_in = weights.shape[1]
        if not layers or fan_in != 1 or layers[-1].activation != "sigmoid":
            raise ModelFileError("the last layer must have one sigmoid output")
        if not all(np.all(np.isfinite(a)) for layer in layers for a in (layer.weights, layer.bias)):
            raise ModelFileError("the model file has non-finite weights")
        return cls(version=str(payload["model_version"]), kind=str(payload["kind"]),
                   embedding_dim=dim, mean=mean, scale=scale, layers=layers,
                   default_thresholds=Thresholds.from_dict(payload["default_thresholds"]),
                   calibration=payload.get("calibration"), metrics=payload.get("metrics", {}),
                   training=payload.get("training", {}))

    # ---------------------------------------------------------------- inference
    def score_batch(self, embeddings: np.ndarray | Sequence[Sequence[float]],
                    texts: Sequence[str]) -> np.ndarray:
        vectors = np.asarray(embeddings, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings must be (n, {self.embedding_dim}), got {vectors.shape}")
        if len(texts) != len(vectors):
            raise ValueError("one text per embedding is required")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.where(norms > 0, norms, 1.0)
        inputs = np.concatenate([vectors, batch_features(texts)], axis=1)
        return forward(inputs, self.mean, self.scale, self.layers)

    def score(self, embedding: Sequence[float] | np.ndarray, text: str) -> float:
        return float(self.score_batch(np.asarray(embedding, dtype=np.float32)[None, :], [text])[0])


def forward(inputs: np.ndarray, mean: np.ndarray, scale: np.ndarray,
            layers: Sequence[Layer]) -> np.ndarray:
    """Scores for rows of [embedding, features] (not yet standardised)."""
    hidden = (np.asarray(inputs, dtype=np.float32) - mean) / scale
    for layer in layers:
        hidden = hidden @ layer.weights + layer.bias
        if layer.activation == "relu":
            hidden = np.maximum(hidden, 0.0)
        else:
            hidden = 1.0 / (1.0 + np.exp(-np.clip(hidden, -30.0, 30.0)))
    return hidden[:, 0].astype(np.float64)


class ComplexityClassifier:
    """Model + thresholds: what the ComplexityClassifier deployment serves."""

    def __init__(self, model: ComplexityModel, thresholds: Thresholds) -> None:
        self.model = model
        self.thresholds = thresholds

    def classify(self, text: str, embedding: Sequence[float],
                 thresholds: Thresholds | None = None) -> dict[str, Any]:
        score = self.model.score(embedding, text)
        tier = (thresholds or self.thresholds).tier(score)
        return {"score": round(score, 6), "tier": tier, "model_version": self.model.version}

    def info(self) -> dict[str, Any]:
        return {"model_version": self.model.version, "kind": self.model.kind,
                "thresholds": self.thresholds.as_dict(), "metrics": self.model.metrics}


class ClassifierService:
    """Loads the model file, derives thresholds, and reloads the file when it changes (a
    retrained or upgraded model is picked up without a redeploy). A file that fails to
    load is logged and the previous model keeps serving."""

    def __init__(self, path: Path, thresholds_for: Callable[[ComplexityModel], Thresholds],
                 reload_check_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.thresholds_for = thresholds_for
        self.reload_check_s = reload_check_s
        self.clock = clock
        self._stamp = self._file_stamp()
        model = ComplexityModel.load(self.path)
        self.classifier = ComplexityClassifier(model, thresholds_for(model))
        self._checked_at = clock()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def current(self) -> ComplexityClassifier:
        if self.reload_check_s > 0 and self.clock() - self._checked_at >= self.reload_check_s:
            self._checked_at = self.clock()
            stamp = self._file_stamp()
            if stamp is not None and stamp != self._stamp:
                self._stamp = stamp
                try:
                    model = ComplexityModel.load(self.path)
                    self.classifier = ComplexityClassifier(model, self.thresholds_for(model))
                    logger.info("router model reloaded: %s", model.version)
                except (ModelFileError, ValueError, KeyError) as exc:
                    logger.warning("router model %s changed but does not load (%s); keeping %s",
                                   self.path, exc, self.classifier.model.version)
        return self.classifier
