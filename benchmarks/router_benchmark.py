"""Router benchmark: cost-quality curve of the learned router on the HELD-OUT split only.

    python -m benchmarks.router_benchmark [--data-dir ../shared/data]
        [--model var/models/router/complexity-v1.json] [--full] [--small-sample 100]

--model is the file the stack serves (trained if missing, like `make run` does); --full also
evaluates a model trained on every training row (var/models/router/complexity-v1-full.json).

What is measured (MMLU held-out rows, 20% of prompts, never trained or calibrated on; the
split fingerprint recorded in the model file is checked):
- quality = share of prompts the chosen tier answers correctly, from the labels:
  medium = RouteLLM's weak model (Mixtral-8x7B), large = its strong model (GPT-4-1106);
- small = the local SmolLM2-135M-Instruct. The MMLU file has no gold answers, so its
  correctness there cannot be measured; we measure SmolLM2 (the weights vLLM serves, greedy
  first token, letter compared with the key) on held-out ARC questions, the easiest
  multiple-choice set we have, and use max(chance 0.25, its ARC-Challenge accuracy) as its
  expected correctness on every MMLU prompt (it is at chance; see the JSON);
- cost from the configured prices (RouterSettings defaults: medium = gpt-4o-mini, large =
  gpt-4o, local = 0), input tokens ~ chars/4, output tokens = calibration.assumed_output_tokens;
- the cost-quality curve (Pareto front over both thresholds), cost saved at 95% of the
  large model's quality for: ours 3-tier, ours 2-tier (medium/large, RouteLLM's setting),
  a random router (same tiers), and thresholds calibrated on the validation split applied
  unchanged to the test split (the honest operating point). RouteLLM's published numbers
  are quoted for reference (their data, their calibration, binary GPT-4/Mixtral);
- classifier latency per request (features + model, after the embedding), median and p99,
  and the embedding latency for one prompt for context.
Outputs: benchmarks/results/router_benchmark.json and router_cost_quality.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, median, percentile, write_result
from serve_app.routing.classifier import ComplexityModel
from serve_app.routing.config import TIERS, RouterSettings
from training.router_data import LabeledPrompt, load_all, split_fingerprint
from training.embedding_cache import EmbeddingCache, cache_dir
from serve_app.routing.policy import (
    CalibrationData,
    calibrate,
    pareto_front,
    threshold_grid,
)
from training.train_router import (
    DEFAULT_DATA_DIR,
    DEFAULT_OUT,
    EMBEDDING_MODEL,
    FULL_OUT,
    approx_tokens,
    train,
)
from serve_app.settings import PROJECT_ROOT

logger = logging.getLogger("benchmarks.router")

KEEP = 0.95
# RouteLLM (Ong et al. 2024; LMSYS blog, July 2024): cost reduction vs. always GPT-4 at 95%
# of GPT-4's quality, best router per benchmark, GPT-4 vs Mixtral-8x7B.
ROUTELLM_PUBLISHED = {"mt_bench": 0.85, "mmlu": 0.45, "gsm8k": 0.35}
SMALL_PROMPT = ("Answer the multiple-choice question with the letter of the correct option "
                "only.\n\n{question}")


# ----------------------------------------------------------------------------- small tier
def measure_small_on_arc(rows: list[LabeledPrompt], per_set: int, var_dir: Path) -> dict[str, Any]:
    """SmolLM2-135M-Instruct (the weights LocalLLM serves) on held-out ARC questions: the
    greedy first token after the chat template, compared with the answer key. Cached."""
    chosen = []
    for arc_set in ("easy", "challenge"):
        candidates = sorted((r for r in rows if r.source == "arc" and r.split == "test"
                             and r.arc_set == arc_set), key=lambda r: r.uid)
        chosen += random.Random(0).sample(candidates, min(per_set, len(candidates)))
    cache_file = var_dir / "cache" / f"router-small-arc-{per_set}.json"
    if cache_file.is_file():
        return json.loads(cache_file.read_text())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve_app.model_prep import ensure_default_model

    torch.set_num_threads(1)
    model_dir = ensure_default_model(var_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    results: dict[str, list[int]] = {"easy": [], "challenge": []}
    answers: dict[str, int] = {}
    started = time.perf_counter()
    with torch.inference_mode():
        for row in chosen:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": SMALL_PROMPT.format(question=row.text)}],
                add_generation_prompt=True, return_tensors="pt")
            if not isinstance(ids, torch.Tensor):
                ids = ids["input_ids"]
            token = int(model(ids).logits[0, -1].argmax())
            answer = tokenizer.decode([token]).strip()[:1].upper()
            answers[answer] = answers.get(answer, 0) + 1
            results[row.arc_set or "easy"].append(int(answer == (row.answer or "").upper()))
    summary = {"model": str(model_dir.name), "method": "greedy first token, letter vs key",
               "rows": {k: len(v) for k, v in results.items()},
               "accuracy": {k: (sum(v) / len(v) if v else None) for k, v in results.items()},
               "answer_letters": answers, "seconds": round(time.perf_counter() - started, 1)}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(summary))
    return summary


# ----------------------------------------------------------------------------- curves
def random_router(data: CalibrationData, keep: float, binary: bool) -> dict[str, float]:
    """A router that picks tiers at random with fixed shares: its expected quality and cost
    are linear in the shares; find the cheapest shares reaching `keep` x large quality."""
    quality = {t: data.all_tier(t)["quality"] for t in TIERS}
    cost = {t: data.all_tier(t)["cost"] for t in TIERS}
    target = keep * quality["large"]
    best = None
    steps = np.linspace(0, 1, 201)
    for small in ([0.0] if binary else steps):
        for large in steps:
            if small + large > 1 + 1e-12:
                continue
            medium = 1 - small - large
            q = small * quality["small"] + medium * quality["medium"] + large * quality["large"]
            c = small * cost["small"] + medium * cost["medium"] + large * cost["large"]
            if q >= target - 1e-12 and (best is None or c < best["cost"]):
                best = {"share_small": small, "share_large": large, "quality": q, "cost": c}
    assert best is not None
    best["cost_saved"] = 1 - best["cost"] / cost["large"]
    return best


def at_keep(points: list[dict[str, float]], data: CalibrationData, keep: float) -> dict[str, float]:
    target = keep * data.all_tier("large")["quality"]
    feasible = [p for p in points if p["quality"] >= target - 1e-12]
    best = min(feasible, key=lambda p: (p["cost"], -p["quality"]))
    return {**best, "cost_saved": 1 - best["cost"] / data.all_tier("large")["cost"]}


def binary_view(data: CalibrationData) -> CalibrationData:
    """medium/large only: the small tier answers like medium and costs the same."""
    return CalibrationData(data.scores,
                           {"small": data.correct["medium"], "medium": data.correct["medium"],
                            "large": data.correct["large"]},
                           {"small": data.cost["medium"], "medium": data.cost["medium"],
                            "large": data.cost["large"]})


# ----------------------------------------------------------------------------- latency
def classifier_latency(model: ComplexityModel, vectors: np.ndarray, texts: list[str],
                       n: int = 1000) -> dict[str, float]:
    timings = []
    for i in range(n):
        j = i % len(texts)
        started = time.perf_counter()
        model.score(vectors[j], texts[j])
        timings.append((time.perf_counter() - started) * 1000)
    return {"n": n, "median_ms": round(median(timings), 4),
            "p99_ms": round(percentile(timings, 99), 4)}


def embedding_latency(texts: list[str], n: int = 30) -> dict[str, float]:
    from serve_app.embedding import TextEmbedder

    embedder = TextEmbedder(EMBEDDING_MODEL, device="cpu", torch_threads=1)
    embedder.embed(texts[:2])
    timings = []
    for i in range(n):
        started = time.perf_counter()
        embedder.embed([texts[i % len(texts)]])
        timings.append((time.perf_counter() - started) * 1000)
    return {"n": n, "median_ms": round(median(timings), 2),
            "p99_ms": round(percentile(timings, 99), 2)}


# ----------------------------------------------------------------------------- plot
def plot(curves: dict[str, list[dict[str, float]]], points: dict[str, dict[str, float]],
         large: dict[str, float], out: Path) -> None:
    """Two panels: the whole range, and a zoom on 80-100% quality where routing matters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    for ax, (y_low, title) in zip(axes, ((0, "whole range"), (80, "zoom: 80-100% quality"))):
        for label, curve in curves.items():
            xs = [100 * p["cost"] / large["cost"] for p in curve]
            ys = [100 * p["quality"] / large["quality"] for p in curve]
            ax.plot(xs, ys, label=label, linestyle=":" if "random" in label else "-",
                    drawstyle="default" if "random" in label else "steps-post")
        markers = iter("osD^vP*X")
        for label, point in points.items():
            ax.scatter([100 * point["cost"] / large["cost"]],
                       [100 * point["quality"] / large["quality"]], zorder=5, label=label,
                       marker=next(markers))
        ax.axhline(100 * KEEP, color="grey", linestyle="--", linewidth=1)
        ax.text(1, 100 * KEEP + 0.3, "95% of always-large quality", color="grey", fontsize=8)
        ax.set_xlabel("cost (% of always-large)")
        ax.set_ylabel("quality (% of always-large)")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, 102)
        ax.set_ylim(y_low, 101.5)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7.5, loc="lower right")
    fig.suptitle("Router on held-out MMLU prompts (RouteLLM labels): cost vs quality")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def random_segments(data: CalibrationData) -> list[dict[str, float]]:
    """A random router's expected cost and quality: linear in its tier shares, so its best
    curve is the upper hull of the always-small, always-medium and always-large points."""
    ordered = sorted((data.all_tier(t) for t in TIERS), key=lambda p: p["cost"])
    hull: list[dict[str, float]] = []
    for point in ordered:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = ((hull[-2]["cost"], hull[-2]["quality"]),
                                  (hull[-1]["cost"], hull[-1]["quality"]))
            if (x2 - x1) * (point["quality"] - y1) - (y2 - y1) * (point["cost"] - x1) >= 0:
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def thin(curve: list[dict[str, float]], keys: tuple[str, ...] = (
        "small_below", "large_from", "quality", "cost", "share_small", "share_medium",
        "share_large")) -> list[dict[str, float]]:
    return [{k: round(float(p[k]), 6) for k in keys if k in p} for p in curve]


# ----------------------------------------------------------------------------- main
def evaluate_model(model: ComplexityModel, mmlu: list[LabeledPrompt], vectors: np.ndarray,
                   correct: dict[str, np.ndarray], cost: dict[str, np.ndarray],
                   test: list[LabeledPrompt], cache: EmbeddingCache,
                   settings: RouterSettings) -> dict[str, Any]:
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    texts = [r.text for r in mmlu]
    scores = model.score_batch(vectors, texts)
    data = CalibrationData(scores, correct, cost)
    binary = binary_view(data)
    large = data.all_tier("large")
    ours3 = pareto_front(threshold_grid(data))
    ours2 = pareto_front([p for p in threshold_grid(binary) if p["small_below"] == 0.0])
    val_thresholds = calibrate(settings.policy, model.calibration, settings.tier_prices())
    honest = data.evaluate(val_thresholds)
    honest["cost_saved"] = 1 - honest["cost"] / large["cost"]
    honest["quality_vs_large"] = honest["quality"] / large["quality"]
    honest["thresholds"] = val_thresholds.as_dict()
    aux: dict[str, Any] = {"mmlu_auc_weak_wrong": float(roc_auc_score(1 - correct["medium"],
                                                                      scores))}
    math_rows = [r for r in test if r.source == "math"]
    math_scores = model.score_batch(cache.get([r.text for r in math_rows]),
                                    [r.text for r in math_rows])
    levels = np.array([r.level for r in math_rows])
    aux["math_spearman_level"] = float(spearmanr(levels, math_scores).statistic)
    aux["math_mean_score_by_level"] = {str(lv): round(float(math_scores[levels == lv].mean()), 4)
                                       for lv in sorted(set(levels.tolist()))}
    arc_rows = [r for r in test if r.source == "arc"]
    arc_scores = model.score_batch(cache.get([r.text for r in arc_rows]),
                                   [r.text for r in arc_rows])
    aux["arc_auc_challenge_vs_easy"] = float(roc_auc_score(
        [r.arc_set == "challenge" for r in arc_rows], arc_scores))
    return {
        "model_version": model.version, "kind": model.kind,
        "train_rows": model.training.get("rows_used"),
        "training_seconds": model.training.get("seconds"),
        "at_95_percent_of_large_quality": {
            "ours_3_tier_curve": at_keep(ours3, data, KEEP),
            "ours_2_tier_curve": at_keep(ours2, binary, KEEP),
            "ours_val_calibrated_on_test": honest,
        },
        "classifier_latency_ms": classifier_latency(model, vectors, texts),
        "auxiliary": aux,
        "curves": {"ours_3_tier": thin(ours3), "ours_2_tier": thin(ours2)},
        "_points": {"honest": honest},
    }


def run(data_dir: Path, model_paths: dict[str, Path], small_sample: int) -> dict[str, Any]:
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    var_dir = PROJECT_ROOT / "var"
    models = {label: ComplexityModel.load(path) for label, path in model_paths.items()}
    rows = load_all(data_dir)
    fingerprint = split_fingerprint(rows, "test")
    for label, model in models.items():
        if model.training.get("split", {}).get("test_fingerprint") != fingerprint:
            raise SystemExit(f"model {label}: the held-out split differs from the one it was "
                             "trained with (data or split code changed): retrain it first")
    test = [r for r in rows if r.split == "test"]
    mmlu = [r for r in test if r.source == "mmlu"]
    cache = EmbeddingCache(cache_dir(var_dir, EMBEDDING_MODEL))
    missing = cache.missing([r.text for r in test])
    if missing:
        from serve_app.embedding import TextEmbedder

        logger.info("embedding %d held-out prompts (cached afterwards)", len(missing))
        cache.fill(missing, TextEmbedder(EMBEDDING_MODEL, device="cpu", torch_threads=2).embed)
    texts = [r.text for r in mmlu]
    vectors = cache.get(texts)

    small = measure_small_on_arc(rows, small_sample, var_dir)
    small_accuracy = max(0.25, small["accuracy"]["challenge"] or 0.0)
    settings = RouterSettings()
    prices = settings.tier_prices()
    output_tokens = settings.policy.calibration.assumed_output_tokens
    tokens_in = np.array([approx_tokens(t) for t in texts], dtype=float)
    cost = {tier: (tokens_in * prices[tier][0] + output_tokens * prices[tier][1]) / 1e6
            for tier in TIERS}
    correct = {"small": np.full(len(mmlu), small_accuracy),
               "medium": np.array([r.weak_correct for r in mmlu], dtype=float),
               "large": np.array([r.strong_correct for r in mmlu], dtype=float)}
    baseline = CalibrationData(np.zeros(len(mmlu)), correct, cost)
    large = baseline.all_tier("large")
    random_curve = random_segments(baseline)

    results = {label: evaluate_model(model, mmlu, vectors, correct, cost, test, cache, settings)
               for label, model in models.items()}
    curves = {f"ours ({label}), Pareto over both thresholds": r["curves"]["ours_3_tier"]
              for label, r in results.items()}
    curves["random router (expected)"] = random_curve
    points = {f"always {t}": baseline.all_tier(t) for t in TIERS}
    points.update({f"ours ({label}), val-calibrated thresholds": r.pop("_points")["honest"]
                   for label, r in results.items()})
    plot_path = RESULTS_DIR / "router_cost_quality.png"
    plot(curves, points, large, plot_path)

    summary = {
        "held_out": {"mmlu_rows": len(mmlu), "math_rows": sum(r.source == "math" for r in test),
                     "arc_rows": sum(r.source == "arc" for r in test),
                     "split_fingerprint": fingerprint},
        "labels": {"medium": "RouteLLM weak model (Mixtral-8x7B) correct",
                   "large": "RouteLLM strong model (GPT-4-1106) correct",
                   "small": f"expected correctness {small_accuracy:.3f} on every prompt = "
                            "max(chance 0.25, SmolLM2-135M accuracy on held-out "
                            "ARC-Challenge); the MMLU file has no gold answers",
                   "small_measurement": small},
        "prices_per_mtok": {t: {"in": prices[t][0], "out": prices[t][1]} for t in TIERS},
        "assumed_output_tokens": output_tokens,
        "always": {t: baseline.all_tier(t) for t in TIERS},
        "random_router_at_95": {"3_tier": random_router(baseline, KEEP, binary=False),
                                "2_tier": random_router(binary_view(baseline), KEEP,
                                                        binary=True)},
        "routellm_published_cost_reduction_at_95": ROUTELLM_PUBLISHED,
        "models": results,
        "embedding_latency_ms_one_prompt": embedding_latency(texts),
        "random_curve": thin(random_curve),
        "plot": str(plot_path.relative_to(PROJECT_ROOT)),
    }
    write_result("router_benchmark", summary)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--model", type=Path, default=DEFAULT_OUT,
                        help="the model the stack serves (trained by make run)")
    parser.add_argument("--full", action="store_true",
                        help=f"also evaluate the model trained on every training row "
                        f"({FULL_OUT.name}; trained first if missing, minutes cold)")
    parser.add_argument("--small-sample", type=int, default=100,
                        help="held-out ARC questions per set (easy, challenge) for SmolLM2")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.model.is_file():
        train(args.data_dir, args.model)
    paths = {"served": args.model}
    if args.full:
        if not FULL_OUT.is_file():
            train(args.data_dir, FULL_OUT, full=True)
        paths["full"] = FULL_OUT
    summary = run(args.data_dir, paths, args.small_sample)
    print(json.dumps({
        "random_router_at_95": {k: v["cost_saved"] for k, v in
                                summary["random_router_at_95"].items()},
        "routellm_published": summary["routellm_published_cost_reduction_at_95"],
        "models": {label: {"cost_saved_at_95": {k: v["cost_saved"] for k, v in
                                                r["at_95_percent_of_large_quality"].items()},
                           "large_share_at_95": {k: v["share_large"] for k, v in
                                                 r["at_95_percent_of_large_quality"].items()},
                           "classifier_latency_ms": r["classifier_latency_ms"],
                           "auxiliary": r["auxiliary"], "train_rows": r["train_rows"]}
                   for label, r in summary["models"].items()},
        "embedding_latency_ms_one_prompt": summary["embedding_latency_ms_one_prompt"]},
        indent=2))


if __name__ == "__main__":
    main()
