"""The cache's pair verifier against the guard alone: recall at a fixed false-hit rate, by
nested group cross-validation on ../shared/data/cache, and the latency it adds per lookup.

    python -m benchmarks.cache_verifier [--data-dir ../shared/data] [--repeats 5]

Quality: the protocol of training/train_cache_verifier.py (pairs and metrics of
training/cache_pairs.py; groups are connected components of the texts; 5 outer folds;
the verifier's cutoff and the guard's cosine threshold are each chosen on the training
folds only, at <= 2% macro false hits on natural and on synthetic near-miss pairs, and
applied to the held-out fold; repeated with `--repeats` fold draws). Curves: every cutoff
(verifier) and every threshold (guard, and plain cosine) over the held-out scores of the
first draw. Recall is over the natural same-meaning families (the synthetic rewordings the
verifier trains on are reported apart, never in the target).

Latency: two CacheServices over the same entries (every cached prompt of the pairs, one
tenant and scope, real vectors), one with the verifier and one guard only; each test
query is looked up in both, interleaved; the median difference is what the verifier adds
(features of the few candidates it scores plus the tree walk, and the guard on the
candidates between 0.80 and 0.925 it now looks at).

Writes benchmarks/results/cache_verifier.json and cache_verifier.png.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, median, percentile, write_result
from serve_app.cache.config import CacheSettings
from serve_app.cache.policy import plan_cache
from serve_app.cache.service import CacheService
from serve_app.settings import PROJECT_ROOT
from training.cache_pairs import worst_false_hit_rate
from training.train_cache_verifier import (
    CUTOFFS,
    DEFAULT_EMBEDDINGS,
    MIN_SIMILARITY,
    TARGET_FALSE_HIT_RATE,
    TARGET_RECALL,
    PairSet,
    brief,
    load_pairs,
    repeated_cross_validation,
)

SWEEP = [round(0.80 + 0.0025 * i, 4) for i in range(80)]  # cosine thresholds 0.80 .. 0.9975


def curve(data: PairSet, served_at: Any, values: list[float]) -> list[dict[str, Any]]:
    points = []
    for value in values:
        metrics = data.metrics(served_at(value))
        points.append({"at": value, **brief(metrics),
                       "false_hit_rate_worst": worst_false_hit_rate(metrics)})
    return points


def recall_at(points: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The curve's best recall with the worst false-hit rate <= target (not a held-out
    number: the point is picked on the curve itself; see 'operating_points')."""
    ok = [p for p in points if p["false_hit_rate_worst"] <= target]
    return max(ok, key=lambda p: p["recall"]) if ok else None


def latency(data: PairSet, vectors: dict[str, np.ndarray], queries: int,
            rounds: int) -> dict[str, Any]:
    cached = sorted({p.cached for p in data.pairs})
    chosen = np.random.default_rng(7).choice(len(data.pairs), size=min(queries,
                                             len(data.pairs)), replace=False)
    body = {"model": "m", "temperature": 0}
    settings = {"verifier": CacheSettings(), "guard_only": CacheSettings(verifier=False)}
    answer = {"object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "answer"},
         "finish_reason": "stop"}]}
    timings: dict[str, list[float]] = {name: [] for name in settings}
    outcomes: dict[str, dict[str, int]] = {name: {} for name in settings}
    with tempfile.TemporaryDirectory(prefix="verifier-bench-") as folder:
        services = {name: CacheService(value, Path(folder) / name)
                    for name, value in settings.items()}
        for service in services.values():
            for text in cached:
                decision = plan_cache({**body, "messages": [{"role": "user", "content": text}]},
                                      None, service.settings)
                service.store_answer("bench", decision.to_dict(), vectors[text], answer)
            service.flush()
        plans = [plan_cache({**body, "messages": [{"role": "user",
                                                   "content": data.pairs[i].query}]},
                            None, CacheSettings()).to_dict() for i in chosen]
        for _ in range(rounds):
            for index, plan in zip(chosen, plans):
                vector = vectors[data.pairs[index].query]
                for name, service in services.items():
                    started = time.perf_counter()
                    result = service.lookup("bench", plan, vector)
                    timings[name].append((time.perf_counter() - started) * 1000)
                    key = "hit" if result["hit"] else result["reason"]
                    outcomes[name][key] = outcomes[name].get(key, 0) + 1
        for service in services.values():
            service.close()
    added = [a - b for a, b in zip(timings["verifier"], timings["guard_only"])]
    return {
        "entries": len(cached), "queries": int(len(chosen)), "rounds": rounds,
        "lookup_ms": {name: {"p50": round(median(v), 3), "p99": round(percentile(v, 99), 3)}
                      for name, v in timings.items()},
        "added_ms_p50": round(median(added), 3),
        "added_ms_p99": round(percentile(added, 99), 3),
        "outcomes_per_lookup": outcomes,
        "note": "in-process CacheService.lookup (memory index), warm text analysis; the "
                "outcomes are not a quality measure (the shipped model saw these pairs)",
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.8))
    styles = {"plain_cosine": ("plain cosine (threshold sweep)", "#999999"),
              "guard": ("cosine + guard (threshold sweep)", "#1f77b4"),
              "verifier": ("guard + verifier (cutoff sweep)", "#d62728")}
    for name, (label, colour) in styles.items():
        points = sorted(result["curves"][name], key=lambda p: p["false_hit_rate_worst"])
        axis.plot([100 * p["false_hit_rate_worst"] for p in points],
                  [100 * p["recall"] for p in points], label=label, color=colour)
    for name, marker in (("guard", "s"), ("verifier", "o")):
        point = result["operating_points"][name]
        worst = max(point["false_hit_rate_natural"], point["false_hit_rate_synthetic"])
        spread = point["recall_range"]
        axis.errorbar([100 * worst], [100 * point["recall"]],
                      yerr=[[100 * (point["recall"] - spread[0])],
                            [100 * (spread[1] - point["recall"])]],
                      fmt=marker, color=styles[name][1], markersize=8, capsize=4,
                      label=f"{name}: nested CV operating point")
    axis.axvline(100 * result["target_false_hit_rate"], color="black", linestyle=":",
                 linewidth=1)
    axis.axhline(100 * result["target_recall"], color="black", linestyle="--", linewidth=1)
    axis.set_xlim(0, 8)
    axis.set_ylim(0, 80)
    axis.set_xlabel("false-hit rate, % (worst of natural and synthetic, macro)")
    axis.set_ylabel("recall of repeated questions, % (macro, natural)")
    axis.set_title("Semantic cache: held-out recall vs false hits (group CV)")
    axis.legend(loc="lower right", fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from threadpoolctl import threadpool_limits

    data, embed_s = load_pairs(Path(args.data_dir), Path(args.embeddings_dir))
    with threadpool_limits(1):
        started = time.perf_counter()
        measured = repeated_cross_validation(data, repeats=args.repeats)
        cv_s = time.perf_counter() - started
    first = measured["runs"][0]
    scores = first["scores"]
    curves = {
        "verifier": curve(data, lambda c: scores >= c, CUTOFFS),
        "guard": curve(data, lambda t: (data.cosine >= t) & data.guard_ok, SWEEP),
        "plain_cosine": curve(data, lambda t: data.cosine >= t, SWEEP),
    }
    vectors = _vectors(data, Path(args.embeddings_dir))
    timing = latency(data, vectors, args.latency_queries, args.latency_rounds)
    operating = {name: {key: value for key, value in measured[name].items()
                        if key not in ("families_first_repeat",)}
                 for name in ("verifier", "guard")}
    return {
        "command": f"python -m benchmarks.cache_verifier --repeats {args.repeats}",
        "data_dir": str(args.data_dir),
        "method": "nested group cross-validation (training/train_cache_verifier.py): "
                  "5 outer folds by connected components of the texts, operating points "
                  "chosen on the training folds only, repeated over fold draws",
        "target_false_hit_rate": TARGET_FALSE_HIT_RATE, "target_recall": TARGET_RECALL,
        "min_similarity": MIN_SIMILARITY,
        "operating_points": operating,
        "families_first_draw": {name: measured[name]["families_first_repeat"]
                                for name in ("verifier", "guard")},
        "best_on_curve_at_target": {name: recall_at(points, TARGET_FALSE_HIT_RATE)
                                    for name, points in curves.items()},
        "latency": timing,
        "curves": curves,
        "pairs": len(data), "cv_seconds": round(cv_s, 1), "embedding_seconds": round(embed_s, 1),
    }


def _vectors(data: PairSet, embeddings_dir: Path) -> dict[str, np.ndarray]:
    from training.embedding_cache import EmbeddingCache

    cache = EmbeddingCache(embeddings_dir)
    texts = sorted({t for p in data.pairs for t in (p.cached, p.query)})
    return dict(zip(texts, cache.get(texts)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(PROJECT_ROOT.parent / "shared" / "data"))
    parser.add_argument("--embeddings-dir", default=str(DEFAULT_EMBEDDINGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency-queries", type=int, default=500)
    parser.add_argument("--latency-rounds", type=int, default=3)
    parser.add_argument("--result-name", default="cache_verifier")
    args = parser.parse_args()
    result = run(args)
    path = write_result(args.result_name, result)
    picture = RESULTS_DIR / f"{args.result_name}.png"
    plot(result, picture)
    for name, point in result["operating_points"].items():
        print(f"{name:9s} recall {point['recall']:.3f} {point['recall_range']}  false hits "
              f"natural {point['false_hit_rate_natural']:.4f} synthetic "
              f"{point['false_hit_rate_synthetic']:.4f}  precision {point['precision']:.3f}")
    timing = result["latency"]
    print(f"lookup p50 ms: {timing['lookup_ms']}; verifier adds p50 "
          f"{timing['added_ms_p50']} ms, p99 {timing['added_ms_p99']} ms")
    print(f"wrote {path} and {picture}")


if __name__ == "__main__":
    main()
