"""Leave-one-source-out (LOSO) evaluation of the router's complexity classifier.

    python -m benchmarks.router_loso [--data-dir ../shared/data] [--max-per-source 400]
        [--result-name router_loso] [--no-plot]

Question: does the classifier (training/train_router.py: logistic regression over the
all-MiniLM-L6-v2 embedding + routing/features.py text features) rank prompts by "the cheap
model will get this wrong" on a kind of prompt it has never seen? Issue 15 measured AUC 0.54
on an unseen math word-problem set, where a prompt-length rule did better. Here every
labelled source is held out in turn: train on all the others, score the held-out one.

Table (source, prompt, y): y = 1 when the weak (cheap) model got the prompt wrong.
One rule per file, which model is weak and which strong:
- routellm_mmlu_labels.csv: weak = Mixtral-8x7B, strong = GPT-4-1106 (`weak_correct`,
  `strong_correct`); `neither` rows are y = 1 like train_router.py's default. Sources: the 4
  standard MMLU subject groups (stem, humanities, social_sciences, other; SUBJECT_GROUP).
- dcrouter_9_models.jsonl: weak = mistral-7b-instruct-v0.3 (a 7B model, 36% right
  overall), strong = llama-3.1-nemotron-51b-instruct (the best of the 9, 60% right). Source =
  `task` (12). Test-split rows with `prompt_in_train` are dropped (duplicates of train rows).
- routerarena_two_models.jsonl: weak = claude-3-haiku-20240307, strong =
  gemini-2.0-flash-001 (the data README's orientation; haiku is right on 152 of 482, gemini
  on 330). Source = `source` family (text before the first `_`/`-`: OpenTDB_*, QANTA_*,
  SuperGLUE-*, Ethics_*, ...); families with < 30 rows are merged into "other".
- arena_bench_v1_judgments.jsonl: weak = Mixtral-8x7B-Instruct-v0.1, strong =
  gpt-4-1106-preview; a model "answers correctly" when the GPT-4 judge scores it >= 8 of
  10 (the README's cut: Mixtral reaches it on 157 of 292), so y = 1 when Mixtral scored < 8.
  One source (299 chat prompts); rows without both scores are dropped.
- math500_test.jsonl, arc_easy_challenge_test.jsonl: no weak/strong correctness. They are
  auxiliary training rows only, exactly as in train_router.py (soft targets: MATH level ->
  0.5..0.9, ARC easy 0.15 / challenge 0.35, weight 0.5) and are never scored.
Each source is capped at --max-per-source rows (seeded SHA-256 order, stratified by y) so
that a cold run embeds ~7.6k prompts (~6-7 min on one core; cached afterwards under
var/cache/router-embeddings, where training and router_benchmark find them too).

Per held-out source: train on every other source's rows (labelled rows target y, weight 1;
auxiliary rows as above), minus any row whose normalised prompt also occurs in the held-out
source (no leakage through duplicated prompts across files). Same inputs, scaler and model
as train_router.py (`model_inputs`, `fit_layers` -> logistic regression, C = 0.02).
Reported on the held-out rows:
- n, positive rate (y = 1), weak and strong model accuracy;
- AUC of y against: the LOSO classifier; a prompt-length score (characters; longer =
  harder); the shipped model models/router/complexity-v1.json for reference (NOT a LOSO
  number for the MMLU sources: it was trained on MMLU), with a 95% bootstrap interval for
  the classifier AUC and for classifier - length;
- cost saved vs always-strong at 95% of always-strong quality, 2-tier router (weak vs
  strong) - the same computation as router_benchmark.py's "ours_2_tier_curve" (Pareto front
  of thresholds on these rows, `at_keep`) and its expected random router (`random_router`).
  The threshold is chosen on the held-out rows themselves (an optimistic, oracle operating
  point, the same for classifier and length; the random router has none to choose).
  Prices (USD per 1M tokens, in/out): weak 0.50/1.50, strong 5.00/15.00 (10x), input tokens
  ~ chars/4, output tokens 256 (RouterSettings' assumed_output_tokens). Where always-weak
  already reaches 95% of strong quality every method saves the same ~90% ("trivial" rows);
  the averages are also given without them.
Macro averages are unweighted means over the scored sources.
Outputs: benchmarks/results/<result-name>.json and .png.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, write_result
from benchmarks.router_benchmark import KEEP, at_keep, random_router
from serve_app.routing.classifier import ComplexityModel, Layer, forward
from serve_app.routing.policy import CalibrationData, pareto_front, threshold_grid
from serve_app.settings import PROJECT_ROOT
from training.embedding_cache import EmbeddingCache, cache_dir
from training.router_data import (
    ARC_FILE,
    MATH_FILE,
    MMLU_FILE,
    load_arc,
    load_math,
    load_mmlu,
    router_dir,
)
from training.train_router import (
    DEFAULT_C,
    DEFAULT_DATA_DIR,
    DEFAULT_OUT,
    EMBEDDING_MODEL,
    approx_tokens,
    auc,
    embed_rows,
    fit_layers,
    model_inputs,
    soft_targets,
    stratified_sample,
)

logger = logging.getLogger("benchmarks.router_loso")

DCROUTER_FILE = "dcrouter_9_models.jsonl"
ROUTERARENA_FILE = "routerarena_two_models.jsonl"
ARENA_FILE = "arena_bench_v1_judgments.jsonl"
ALL_FILES = (MMLU_FILE, DCROUTER_FILE, ROUTERARENA_FILE, ARENA_FILE, MATH_FILE, ARC_FILE)

MODELS = {  # file -> (weak, strong)
    MMLU_FILE: ("Mixtral-8x7B", "gpt-4-1106"),
    DCROUTER_FILE: ("mistral-7b-instruct-v0.3", "llama-3.1-nemotron-51b-instruct"),
    ROUTERARENA_FILE: ("claude-3-haiku-20240307", "gemini-2.0-flash-001"),
    ARENA_FILE: ("Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"),
}
ARENA_GOOD = 8           # judge score (1-10) counted as a correct answer
MIN_SOURCE_ROWS = 30     # smaller routerarena families are merged into "other"
DEFAULT_MAX_PER_SOURCE = 400
PRICES = {"weak": (0.50, 1.50), "strong": (5.00, 15.00)}  # USD per 1M tokens, in / out
OUTPUT_TOKENS = 256
SEED = "router-loso-v1"
BOOTSTRAP = 300

SUBJECT_GROUP = {}
for _group, _subjects in {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry "
            "college_computer_science college_mathematics college_physics computer_security "
            "conceptual_physics electrical_engineering elementary_mathematics "
            "high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics "
            "machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history "
                  "high_school_world_history international_law jurisprudence "
                  "logical_fallacies moral_disputes moral_scenarios philosophy prehistory "
                  "professional_law world_religions",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics "
                       "high_school_psychology human_sexuality professional_psychology "
                       "public_relations security_studies sociology us_foreign_policy",
}.items():
    for _subject in _subjects.split():
        SUBJECT_GROUP[_subject] = _group
# everything else (business_ethics, clinical_knowledge, college_medicine, global_facts,
# human_aging, management, marketing, medical_genetics, miscellaneous, nutrition,
# professional_accounting, professional_medicine, virology) is "other", as in MMLU.


@dataclass
class Row:
    source: str               # e.g. "dcrouter:gsm8k"; aux rows: "aux:math", "aux:arc"
    file: str
    text: str
    target: float             # training target in [0, 1]
    weight: float
    y: int | None = None      # 1 = weak model wrong; None for auxiliary rows
    weak_correct: int | None = None
    strong_correct: int | None = None

    @property
    def scored(self) -> bool:
        return self.y is not None


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _order(text: str) -> str:
    return hashlib.sha256(f"{SEED}\n{_norm(text)}".encode()).hexdigest()


def labelled(source: str, file: str, text: str, weak: int, strong: int) -> Row:
    y = 1 - int(weak)
    return Row(source, file, text, float(y), 1.0, y, int(weak), int(strong))


def cap(rows: list[Row], limit: int | None) -> list[Row]:
    """Duplicates (normalised text) dropped, then at most `limit` rows, the same share of
    each y (aux rows: of each target), in seeded hash order."""
    seen: set[str] = set()
    unique = []
    for row in sorted(rows, key=lambda r: _order(r.text)):
        if _norm(row.text) not in seen:
            seen.add(_norm(row.text))
            unique.append(row)
    if limit is None or len(unique) <= limit:
        return unique
    strata: dict[Any, list[Row]] = defaultdict(list)
    for row in unique:
        strata[row.y if row.scored else row.target].append(row)
    share = limit / len(unique)
    return [r for members in strata.values() for r in members[:max(1, round(len(members) * share))]]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def load_table(data_dir: Path, max_per_source: int | None) -> tuple[list[Row], dict[str, Any]]:
    """Every labelled source (capped) plus the auxiliary rows, and the data fingerprint."""
    base = router_dir(data_dir)
    by_source: dict[str, list[Row]] = defaultdict(list)
    raw_rows: dict[str, int] = {}

    mmlu = load_mmlu(base / MMLU_FILE)
    raw_rows[MMLU_FILE] = len(mmlu)
    for r in mmlu:
        subject = r.uid.split(":")[1]
        by_source[f"mmlu:{SUBJECT_GROUP.get(subject, 'other')}"].append(
            labelled(f"mmlu:{SUBJECT_GROUP.get(subject, 'other')}", MMLU_FILE, r.text,
                     int(r.weak_correct or 0), int(r.strong_correct or 0)))

    weak, strong = MODELS[DCROUTER_FILE]
    items = _jsonl(base / DCROUTER_FILE)
    raw_rows[DCROUTER_FILE] = len(items)
    for item in items:
        if item["split"] == "test" and item.get("prompt_in_train") in (True, "True", "true", 1):
            continue
        source = f"dcrouter:{item['task']}"
        by_source[source].append(labelled(source, DCROUTER_FILE, item["prompt"],
                                          item["correct"][weak], item["correct"][strong]))

    weak, strong = MODELS[ROUTERARENA_FILE]
    items = _jsonl(base / ROUTERARENA_FILE)
    raw_rows[ROUTERARENA_FILE] = len(items)
    families = Counter(re.split(r"[_-]", item["source"], maxsplit=1)[0] for item in items)
    for item in items:
        family = re.split(r"[_-]", item["source"], maxsplit=1)[0]
        source = f"routerarena:{family if families[family] >= MIN_SOURCE_ROWS else 'other'}"
        by_source[source].append(labelled(source, ROUTERARENA_FILE, item["prompt"],
                                          item["correct"][weak], item["correct"][strong]))

    weak, strong = MODELS[ARENA_FILE]
    items = _jsonl(base / ARENA_FILE)
    raw_rows[ARENA_FILE] = len(items)
    for item in items:
        scores = item["scores"]
        if scores.get(weak) is None or scores.get(strong) is None:
            continue
        by_source["arena"].append(labelled("arena", ARENA_FILE, item["prompt"],
                                           int(scores[weak] >= ARENA_GOOD),
                                           int(scores[strong] >= ARENA_GOOD)))

    rows: list[Row] = []
    for source in sorted(by_source):
        rows += cap(by_source[source], max_per_source)

    # auxiliary rows, targets and weights exactly as train_router.py gives them
    for name, loader, file in (("math", load_math, MATH_FILE), ("arc", load_arc, ARC_FILE)):
        prompts = loader(base / file)
        raw_rows[file] = len(prompts)
        prompts = stratified_sample(prompts, max_per_source)
        keep, targets, weights = soft_targets(prompts, "hard")
        rows += [Row(f"aux:{name}", file, prompts[i].text, float(t), float(w))
                 for i, t, w in zip(keep, targets, weights)]

    fingerprint = {"files": {}, "rows_used": dict(Counter(r.file for r in rows))}
    for name in ALL_FILES:
        path = base / name
        fingerprint["files"][name] = {
            "bytes": path.stat().st_size, "rows": raw_rows.get(name),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return rows, fingerprint


# ----------------------------------------------------------------------------- metrics
def rank01(values: np.ndarray) -> np.ndarray:
    """Scores in (0, 1) by rank, for threshold grids that expect [0, 1] scores."""
    from scipy.stats import rankdata

    return (rankdata(values) - 0.5) / max(len(values), 1)


def two_tier(rows: list[Row]) -> CalibrationData:
    tokens_in = np.array([approx_tokens(r.text) for r in rows], dtype=float)
    cost = {tier: (tokens_in * PRICES[tier][0] + OUTPUT_TOKENS * PRICES[tier][1]) / 1e6
            for tier in PRICES}
    weak = np.array([r.weak_correct for r in rows], dtype=float)
    strong = np.array([r.strong_correct for r in rows], dtype=float)
    # the 3-tier CalibrationData with small == medium == weak (router_benchmark.binary_view)
    return CalibrationData(np.zeros(len(rows)), {"small": weak, "medium": weak, "large": strong},
                           {"small": cost["weak"], "medium": cost["weak"],
                            "large": cost["strong"]})


def saving_at_keep(data: CalibrationData, scores: np.ndarray) -> dict[str, float]:
    """router_benchmark's ours_2_tier_curve point: cheapest 2-tier threshold on the Pareto
    front that keeps KEEP x always-strong quality."""
    scored = CalibrationData(np.clip(scores, 0.0, 1.0), dict(data.correct), dict(data.cost))
    front = pareto_front([p for p in threshold_grid(scored) if p["small_below"] == 0.0])
    point = at_keep(front, scored, KEEP)
    return {"cost_saved": round(point["cost_saved"], 4),
            "strong_share": round(point["share_large"], 4)}


def bootstrap(y: np.ndarray, a: np.ndarray, b: np.ndarray, reps: int, seed: int
              ) -> dict[str, list[float] | None]:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    auc_a, diff = [], []
    for _ in range(reps):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() == y[idx].max():
            continue
        x = roc_auc_score(y[idx], a[idx])
        auc_a.append(x)
        diff.append(x - roc_auc_score(y[idx], b[idx]))
    if len(auc_a) < reps // 2:
        return {"auc_ci95": None, "auc_minus_length_ci95": None}
    ci = lambda v: [round(float(np.quantile(v, 0.025)), 4), round(float(np.quantile(v, 0.975)), 4)]
    return {"auc_ci95": ci(auc_a), "auc_minus_length_ci95": ci(diff)}


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def fit_and_score(train_x: np.ndarray, train_t: np.ndarray, train_w: np.ndarray,
                  test_x: np.ndarray, c: float) -> np.ndarray:
    mean, scale, layers = fit_layers(train_x, train_t, train_w, kind="logistic", c=c)
    parsed = [Layer(np.asarray(l["weights"], dtype=np.float32),
                    np.asarray(l["bias"], dtype=np.float32), l["activation"]) for l in layers]
    return forward(test_x, mean.astype(np.float32), np.asarray(scale, dtype=np.float32), parsed)


def evaluate(rows: list[Row], inputs: np.ndarray, shipped: np.ndarray | None, c: float,
             reps: int) -> list[dict[str, Any]]:
    targets = np.array([r.target for r in rows])
    weights = np.array([r.weight for r in rows])
    norms = np.array([_norm(r.text) for r in rows], dtype=object)
    lengths = np.array([len(r.text) for r in rows], dtype=float)
    sources = sorted({r.source for r in rows if r.scored})
    table = []
    for k, source in enumerate(sources):
        held = np.array([r.source == source for r in rows])
        held_texts = set(norms[held].tolist())
        train = ~held & np.array([n not in held_texts for n in norms])
        started = time.perf_counter()
        scores = fit_and_score(inputs[train], targets[train], weights[train], inputs[held], c)
        test_rows = [r for r, h in zip(rows, held) if h]
        y = np.array([r.y for r in test_rows])
        data = two_tier(test_rows)
        strong_q = data.all_tier("large")["quality"]
        weak_q = data.all_tier("medium")["quality"]
        rand = random_router(data, KEEP, binary=True)
        entry = {
            "source": source, "file": test_rows[0].file, "n": len(test_rows),
            "train_rows": int(train.sum()),
            "dropped_duplicates": int((~held).sum() - train.sum()),
            "positive_rate": _round(y.mean()), "weak_accuracy": _round(weak_q),
            "strong_accuracy": _round(strong_q),
            "trivial": bool(weak_q >= KEEP * strong_q),
            "auc": {"classifier": _round(auc(y, scores)),
                    "length": _round(auc(y, lengths[held])),
                    "shipped_model": _round(auc(y, shipped[held])) if shipped is not None
                    else None},
            "cost_saved_at_95": {
                "classifier": saving_at_keep(data, scores),
                "length": saving_at_keep(data, rank01(lengths[held])),
                "random_expected": {"cost_saved": round(rand["cost_saved"], 4),
                                    "strong_share": round(rand["share_large"], 4)}},
            "fit_seconds": round(time.perf_counter() - started, 2),
        }
        entry["bootstrap"] = bootstrap(y, scores, lengths[held], reps, k)
        table.append(entry)
        logger.info("%-28s n=%3d pos=%.2f auc=%s len=%s", source, len(test_rows), y.mean(),
                    entry["auc"]["classifier"], entry["auc"]["length"])
    return table


def averages(table: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(values: list[float | None]) -> float | None:
        values = [v for v in values if v is not None]
        return round(float(np.mean(values)), 4) if values else None

    def block(entries: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "sources": len(entries),
            "auc": {k: mean([e["auc"][k] for e in entries])
                    for k in ("classifier", "length", "shipped_model")},
            "cost_saved_at_95": {k: mean([e["cost_saved_at_95"][k]["cost_saved"] for e in entries])
                                 for k in ("classifier", "length", "random_expected")}}

    with_auc = [e for e in table if e["auc"]["classifier"] is not None
                and e["auc"]["length"] is not None]
    result = {"macro_all": block(table),
              "macro_non_trivial": block([e for e in table if not e["trivial"]]),
              "classifier_beats_length_auc": sum(e["auc"]["classifier"] > e["auc"]["length"]
                                                 for e in with_auc),
              "classifier_beats_length_auc_ci_excludes_0": sum(
                  1 for e in with_auc if e["bootstrap"]["auc_minus_length_ci95"]
                  and e["bootstrap"]["auc_minus_length_ci95"][0] > 0),
              "length_beats_classifier_auc_ci_excludes_0": sum(
                  1 for e in with_auc if e["bootstrap"]["auc_minus_length_ci95"]
                  and e["bootstrap"]["auc_minus_length_ci95"][1] < 0),
              "classifier_auc_below_0_6": [e["source"] for e in with_auc
                                           if e["auc"]["classifier"] < 0.6],
              "sources_with_auc": len(with_auc)}
    by_file: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in table:
        by_file[e["file"]].append(e)
    result["macro_by_file"] = {f: block(v) for f, v in by_file.items()}
    return result


# ----------------------------------------------------------------------------- output
def markdown(table: list[dict[str, Any]], avg: dict[str, Any]) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    lines = ["| source | n | pos rate | weak/strong acc | AUC clf | AUC len | AUC shipped | "
             "saved@95 clf | saved@95 len | saved@95 random |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        s = e["cost_saved_at_95"]
        lines.append(
            f"| {e['source']}{' (trivial)' if e['trivial'] else ''} | {e['n']} | "
            f"{f(e['positive_rate'])} | {f(e['weak_accuracy'])}/{f(e['strong_accuracy'])} | "
            f"{f(e['auc']['classifier'])} | {f(e['auc']['length'])} | "
            f"{f(e['auc']['shipped_model'])} | {pct(s['classifier']['cost_saved'])} | "
            f"{pct(s['length']['cost_saved'])} | {pct(s['random_expected']['cost_saved'])} |")
    for label in ("macro_all", "macro_non_trivial"):
        b = avg[label]
        lines.append(f"| **{label}** ({b['sources']}) | | | | {f(b['auc']['classifier'])} | "
                     f"{f(b['auc']['length'])} | {f(b['auc']['shipped_model'])} | "
                     f"{pct(b['cost_saved_at_95']['classifier'])} | "
                     f"{pct(b['cost_saved_at_95']['length'])} | "
                     f"{pct(b['cost_saved_at_95']['random_expected'])} |")
    lines.append(f"\nclassifier AUC > length AUC on {avg['classifier_beats_length_auc']} of "
                 f"{avg['sources_with_auc']} sources (bootstrap 95% CI of the difference above "
                 f"0: {avg['classifier_beats_length_auc_ci_excludes_0']}, below 0: "
                 f"{avg['length_beats_classifier_auc_ci_excludes_0']})")
    return "\n".join(lines)


def plot(table: list[dict[str, Any]], out: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [e["source"] for e in table]
    x = np.arange(len(labels))
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 0.55 * len(labels)), 8.5), sharex=True)
    series = (("classifier", "LOSO classifier"), ("length", "prompt length"),
              ("shipped_model", "shipped model (not LOSO on MMLU)"))
    for i, (key, name) in enumerate(series):
        axes[0].bar(x + (i - 1) * 0.27, [e["auc"][key] or 0.5 for e in table], 0.27, label=name)
    axes[0].axhline(0.5, color="grey", linestyle="--", linewidth=1)
    axes[0].set_ylim(0.1, 1.0)
    axes[0].set_ylabel("AUC (weak model wrong)")
    axes[0].legend(fontsize=8, ncol=3, loc="upper left")
    axes[0].grid(axis="y", alpha=0.3)
    for i, (key, name) in enumerate((("classifier", "LOSO classifier"),
                                     ("length", "prompt length"),
                                     ("random_expected", "random (expected)"))):
        axes[1].bar(x + (i - 1) * 0.27,
                    [100 * e["cost_saved_at_95"][key]["cost_saved"] for e in table], 0.27,
                    label=name)
    axes[1].set_ylabel("cost saved at 95% of strong quality (%)")
    axes[1].legend(fontsize=8, ncol=3, loc="upper left")
    axes[1].grid(axis="y", alpha=0.3)
    axes[1].set_xticks(x)
    axes[1].set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    fig.suptitle("Router classifier, leave-one-source-out (2-tier, strong = 10x weak price)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- main
def run(data_dir: Path, max_per_source: int | None, result_name: str, c: float = DEFAULT_C,
        reps: int = BOOTSTRAP, make_plot: bool = True) -> dict[str, Any]:
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    started = time.perf_counter()
    rows, fingerprint = load_table(data_dir, max_per_source)
    cache = EmbeddingCache(cache_dir(PROJECT_ROOT / "var", EMBEDDING_MODEL))
    to_embed = len(cache.missing([r.text for r in rows]))
    logger.info("%d rows, %d sources, %d prompts to embed", len(rows),
                len({r.source for r in rows if r.scored}), to_embed)
    embed_seconds = embed_rows(rows, cache, threads=1)
    inputs = model_inputs(rows, cache)
    shipped = None
    if DEFAULT_OUT.is_file():
        model = ComplexityModel.load(DEFAULT_OUT)
        shipped = model.score_batch(inputs[:, :model.embedding_dim], [r.text for r in rows])
    table = evaluate(rows, inputs, shipped, c, reps)
    avg = averages(table)
    plot_path = RESULTS_DIR / f"{result_name}.png"
    plotted = make_plot and plot(table, plot_path)
    summary = {
        "config": {
            "command": "python -m benchmarks.router_loso"
                       + ("" if max_per_source == DEFAULT_MAX_PER_SOURCE
                          else f" --max-per-source {max_per_source}"),
            "max_per_source": max_per_source, "model": "logistic regression (train_router."
            "fit_layers), inputs = all-MiniLM-L6-v2 embedding + routing/features.py",
            "C": c, "weak_strong_models": {f: {"weak": w, "strong": s}
                                           for f, (w, s) in MODELS.items()},
            "arena_correct_if_judge_score_at_least": ARENA_GOOD,
            "routerarena_min_source_rows": MIN_SOURCE_ROWS,
            "auxiliary_training_only": [MATH_FILE, ARC_FILE],
            "prices_per_mtok": {k: {"in": v[0], "out": v[1]} for k, v in PRICES.items()},
            "output_tokens": OUTPUT_TOKENS, "keep_quality": KEEP,
            "threshold": "oracle: best 2-tier cut on the held-out rows (router_benchmark "
                         "ours_2_tier_curve)", "bootstrap_reps": reps,
            "shipped_model": str(DEFAULT_OUT.relative_to(PROJECT_ROOT)),
        },
        "data": fingerprint,
        "rows": {"total": len(rows), "scored": sum(r.scored for r in rows),
                 "auxiliary": sum(not r.scored for r in rows)},
        "averages": avg,
        "per_source": table,
        "seconds": {"embedding": round(embed_seconds, 1), "embedded_prompts": to_embed,
                    "total": round(time.perf_counter() - started, 1)},
        "plot": str(plot_path.relative_to(PROJECT_ROOT)) if plotted else None,
    }
    write_result(result_name, summary)
    summary["markdown"] = markdown(table, avg)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--max-per-source", type=int, default=DEFAULT_MAX_PER_SOURCE,
                        help="rows per source (0 = all)")
    parser.add_argument("--result-name", default="router_loso")
    parser.add_argument("--C", dest="c", type=float, default=DEFAULT_C)
    parser.add_argument("--bootstrap", type=int, default=BOOTSTRAP)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    summary = run(args.data_dir, args.max_per_source or None, args.result_name, c=args.c,
                  reps=args.bootstrap, make_plot=not args.no_plot)
    print(summary["markdown"])


if __name__ == "__main__":
    main()
