"""Labelled query/cached-prompt pairs for calibrating the semantic cache and training its
pair verifier, built from <data-dir>/cache/ (../shared/data; nothing at run time reads it).

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

Metrics (`served_metrics`): recall is the share of same-pairs served, the false-hit rate the
share of different-pairs served; families are averaged with equal weight (macro), so a
result does not depend on how many pairs each source has; the natural and the synthetic
different-families are also reported apart, and a target holds only if it holds on both.

Used by benchmarks/cache_calibration.py (the guard's threshold), training/
train_cache_verifier.py and benchmarks/cache_verifier.py (the verifier).
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serve_app.cache.policy import normalize_prompt, query_text

DATA_FILES = ("gptcache_mock_paraphrases.jsonl", "stsb_dev.csv",
              "sts2016_question_question.csv")
SAME_MIN_SCORE = 4.0
DIFFERENT_MAX_SCORE = 3.0

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


# Same-meaning rewordings (training only: a verifier that never saw "colour"/"color" or
# "What is"/"What's" learns that a near-identical pair with one changed word is a
# near-miss, because every such pair in the data is one).
_REWORDINGS = [(r"\bWhat is\b", "What's"), (r"\bWhat's\b", "What is"),
               (r"\bHow do I\b", "How can I"), (r"\bHow can I\b", "How do I"),
               (r"\bdo not\b", "don't"), (r"\bdon't\b", "do not"),
               (r"\bcannot\b", "can't"), (r"\bcan't\b", "cannot"),
               (r"\bis it possible to\b", "can I"), (r"\bI am\b", "I'm"),
               (r"\bit is\b", "it's"), (r"^A (?=[a-z])", "The "), (r"^The (?=[a-z])", "A ")]
_SPELLINGS = [("color", "colour"), ("favorite", "favourite"), ("center", "centre"),
              ("organize", "organise"), ("analyze", "analyse"), ("behavior", "behaviour"),
              ("neighbor", "neighbour"), ("gray", "grey"), ("license", "licence"),
              ("theater", "theatre"), ("realize", "realise"), ("flavor", "flavour")]
_SPELLING = {a: b for a, b in _SPELLINGS} | {b: a for a, b in _SPELLINGS}
_WRAPPERS = ["Quick question: {}", "Please tell me: {}", "{} Thanks!", "Hi, {}"]
REWORDINGS_PER_FAMILY = 400


def reword(text: str, rng: random.Random) -> str | None:
    """The same question or sentence in other words: a contraction, another spelling, a
    greeting or thanks around it."""
    choice = rng.random()
    if choice < 0.5:
        options = [(pattern, new) for pattern, new in _REWORDINGS if re.search(pattern, text)]
        words = [w for w in re.findall(r"[a-z]+", text) if w in _SPELLING]
        if words and (not options or rng.random() < 0.5):
            word = rng.choice(words)
            return re.sub(rf"\b{word}\b", _SPELLING[word], text, count=1)
        if options:
            pattern, new = rng.choice(options)
            return re.sub(pattern, new, text, count=1)
    return rng.choice(_WRAPPERS).format(text)


def synthetic_rewordings(bases: list[str], seed: int) -> list[Pair]:
    """Same-meaning variants of the synthetic bases (family synth_same): for training the
    verifier; the recall targets are measured on the natural families only."""
    rng = random.Random(f"rewordings:{seed}")
    made = []
    for text in bases:
        variant = reword(text, rng)
        if variant and normalize_prompt(variant) != normalize_prompt(text):
            made.append(Pair("synth_same", True, text, variant, text))
    rng.shuffle(made)
    return made[:REWORDINGS_PER_FAMILY]


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


# ---- the whole set, its groups and its fingerprint ------------------------------------------

def all_pairs(cache_dir: Path, vectors_for: Callable[[list[str]], dict[str, np.ndarray]],
              *, seed: int = 13, same_min: float = SAME_MIN_SCORE,
              different_max: float = DIFFERENT_MAX_SCORE, rewordings: bool = False
              ) -> tuple[list[Pair], dict[str, np.ndarray]]:
    """Natural, nearest-other and synthetic pairs (the calibration benchmark's set, same
    seed, same order; with `rewordings` also synth_same) and the embedding of every text.
    `vectors_for(texts)` embeds."""
    rng = random.Random(seed)
    natural = load_natural_pairs(cache_dir, same_min, different_max)
    bases = synthetic_bases(cache_dir)
    synthetic = synthetic_pairs(bases, rng)
    if rewordings:
        synthetic += synthetic_rewordings(bases, seed)
    texts = sorted({t for p in natural + synthetic for t in (p.cached, p.query)})
    vectors = vectors_for(texts)
    paraphrases = [p for p in natural if p.family == "gptcache_paraphrase"]
    return natural + nearest_other_pairs([p.cached for p in paraphrases], vectors) + synthetic, \
        vectors


def text_groups(pairs: Sequence[Pair]) -> np.ndarray:
    """One group id per pair: the connected component of its texts (normalised), linking
    a pair's two texts and its anchor. Folds split by these groups never put one text,
    or a paraphrase of it, on both sides."""
    parent: dict[str, str] = {}

    def find(text: str) -> str:
        parent.setdefault(text, text)
        while parent[text] != text:
            parent[text] = parent[parent[text]]
            text = parent[text]
        return text

    for pair in pairs:
        cached, query, anchor = (normalize_prompt(t) for t in (pair.cached, pair.query,
                                                                 pair.anchor))
        parent[find(query)] = find(cached)
        parent[find(anchor)] = find(cached)
    roots: dict[str, int] = {}
    return np.array([roots.setdefault(find(normalize_prompt(p.cached)), len(roots))
                     for p in pairs])


def data_fingerprint(cache_dir: Path) -> dict[str, Any]:
    """SHA-256 of every data file read, and of them together."""
    files = {name: hashlib.sha256((cache_dir / name).read_bytes()).hexdigest()
             for name in DATA_FILES}
    combined = hashlib.sha256("".join(files[name] for name in DATA_FILES).encode())
    return {"sha256": combined.hexdigest(), "files": files}


def served_metrics(pairs: Sequence[Pair], served: np.ndarray,
                   indexes: Iterable[int] | None = None) -> dict[str, Any]:
    """Macro recall (natural same-families) and false-hit rates of a served/not-served
    decision per pair (over `indexes`, default all), per family, and pooled precision."""
    chosen = list(range(len(pairs))) if indexes is None else list(indexes)
    families: dict[str, list[int]] = defaultdict(list)
    for index in chosen:
        families[pairs[index].family].append(index)
    per_family = {}
    recalls, false_hits = [], []
    for family, members in sorted(families.items()):
        rate = float(served[members].mean())
        same = pairs[members[0]].same
        per_family[family] = {"pairs": len(members),
                              ("recall" if same else "false_hit_rate"): round(rate, 4)}
        if not (same and family.startswith("synth_")):  # recall: natural repeats only
            (recalls if same else false_hits).append(rate)
    labels = np.array([pairs[i].same for i in chosen], dtype=bool)
    taken = np.asarray(served, dtype=bool)[chosen]
    tp = int((taken & labels).sum())
    fp = int((taken & ~labels).sum())
    natural = [v["false_hit_rate"] for f, v in per_family.items()
               if "false_hit_rate" in v and not f.startswith("synth_")]
    synthetic = [v["false_hit_rate"] for f, v in per_family.items()
                 if "false_hit_rate" in v and f.startswith("synth_")]
    return {
        "recall": round(float(np.mean(recalls)), 4),
        "false_hit_rate": round(float(np.mean(false_hits)), 4),
        "false_hit_rate_natural": round(float(np.mean(natural)), 4) if natural else 0.0,
        "false_hit_rate_synthetic": round(float(np.mean(synthetic)), 4) if synthetic else 0.0,
        "precision": round(tp / (tp + fp), 4) if tp + fp else 1.0,
        "served_pairs": tp + fp, "true_hits": tp, "false_hits": fp,
        "families": per_family,
    }


def worst_false_hit_rate(metrics: dict[str, Any]) -> float:
    """The target's measure: natural and synthetic false-hit rates must each meet it."""
    return max(metrics["false_hit_rate_natural"], metrics["false_hit_rate_synthetic"])
