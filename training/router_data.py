"""Labeled router data from `<data_dir>/router/`, the training targets and the held-out split.

Sources (see the data README):
- `routellm_mmlu_labels.csv`: per MMLU prompt, was the weak model (Mixtral-8x7B) right,
  was the strong model (GPT-4-1106) right.
- `math500_test.jsonl`: MATH-500 problems with their human difficulty level 1-5.
- `arc_easy_challenge_test.jsonl`: ARC questions, easy or challenge.

Target: the complexity score is trained as the probability that the *medium* tier model
(the labels' weak model) gets the prompt wrong, so a higher score means "send it up".
- MMLU: 1 if the weak model was wrong, else 0. `neither` rows (both models wrong) count as
  hard (target 1, full weight): they are hard prompts, and `train.py --neither` can drop
  them or label them 0 instead; we measured all three variants (see train.py docstring).
- MATH-500: no model labels, only difficulty. Ordinal soft target 0.5 + 0.1 * (level - 1)
  (0.5 .. 0.9): competition maths is at least a coin flip for a mid-size model and gets
  harder with the level.
- ARC: easy 0.15, challenge 0.35 (short grade-school science questions; challenge ones were
  the ones simple solvers failed).
MATH and ARC are auxiliary (weight AUX_WEIGHT each row); only MMLU has correctness labels,
so only MMLU rows are used for calibration and for the router benchmark.

Split: by prompt and stratified. Rows with the same normalised prompt text form one group
and always land in the same split. Inside each stratum (source, subject/level, label) the
groups are ordered by a seeded SHA-256 of their text and the first TEST_FRACTION go to
`test` (held out: only the benchmark reads them), the next VAL_FRACTION to `val`
(calibration and model selection), the rest to `train`. The order is a pure function of the
text and the seed, so the split is the same on every machine and run. MMLU rows flagged
`contaminated` (prompts RouteLLM's own routers were trained on) are never held out: they
go to `train`, so no benchmark number is measured on them.
"""
from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROUTER_SUBDIR = "router"
MMLU_FILE = "routellm_mmlu_labels.csv"
MATH_FILE = "math500_test.jsonl"
ARC_FILE = "arc_easy_challenge_test.jsonl"
DATA_FILES = (MMLU_FILE, MATH_FILE, ARC_FILE)

SPLIT_SEED = "router-split-v1"
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1
AUX_WEIGHT = 0.5
NEITHER_POLICIES = ("hard", "drop", "easy")
MATH_TARGET = {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.8, 5: 0.9}
ARC_TARGET = {"easy": 0.15, "challenge": 0.35}


@dataclass
class LabeledPrompt:
    source: str                      # "mmlu" | "math" | "arc"
    uid: str                         # stable id: "mmlu:<subject>:<idx>", "math:<unique_id>", ...
    text: str                        # what the classifier sees (as a user would send it)
    stratum: str
    weak_correct: int | None = None  # MMLU only
    strong_correct: int | None = None
    min_model: str | None = None     # weak | strong | neither
    contaminated: bool = False
    level: int | None = None         # MATH 1..5
    arc_set: str | None = None       # easy | challenge
    answer: str | None = None        # ARC answer letter
    split: str = field(default="train")

    def target(self, neither: str = "hard") -> float | None:
        """Probability that the medium tier fails; None drops the row from training."""
        if self.source == "mmlu":
            if self.min_model == "neither":
                return {"hard": 1.0, "easy": 0.0, "drop": None}[neither]
            return float(1 - int(self.weak_correct or 0))
        if self.source == "math":
            return MATH_TARGET[int(self.level or 3)]
        return ARC_TARGET[self.arc_set or "easy"]

    def weight(self) -> float:
        return 1.0 if self.source == "mmlu" else AUX_WEIGHT


def router_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / ROUTER_SUBDIR


def data_hash(data_dir: str | Path) -> str:
    """SHA-256 over the three data files (names and bytes): the data version."""
    digest = hashlib.sha256()
    for name in DATA_FILES:
        digest.update(name.encode())
        digest.update((router_dir(data_dir) / name).read_bytes())
    return digest.hexdigest()


def format_choices(question: str, choices: Iterable[tuple[str, str]]) -> str:
    """MMLU's prompt layout, so ARC rows look like the MMLU rows the model learns from."""
    lines = [question.strip()] + [f"{label}. {text}" for label, text in choices]
    return "\n".join(lines) + "\nAnswer:"


def load_mmlu(path: Path) -> list[LabeledPrompt]:
    rows = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            rows.append(LabeledPrompt(
                source="mmlu", uid=f"mmlu:{row['subject']}:{row['idx']}", text=row["prompt"],
                stratum=f"mmlu:{row['subject']}:{row['min_model']}",
                weak_correct=int(row["weak_correct"]), strong_correct=int(row["strong_correct"]),
                min_model=row["min_model"], contaminated=row["contaminated"] == "1"))
    return rows


def load_math(path: Path) -> list[LabeledPrompt]:
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        rows.append(LabeledPrompt(
            source="math", uid=f"math:{item['unique_id']}", text=item["problem"],
            stratum=f"math:{item['level']}", level=int(item["level"])))
    return rows


def load_arc(path: Path) -> list[LabeledPrompt]:
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        choices = [(c["label"], c["text"]) for c in item["choices"]]
        rows.append(LabeledPrompt(
            source="arc", uid=f"arc:{item['id']}", text=format_choices(item["question"], choices),
            stratum=f"arc:{item['arc_set']}", arc_set=item["arc_set"],
            answer=item["answerKey"]))
    return rows


def load_all(data_dir: str | Path) -> list[LabeledPrompt]:
    """Every labeled prompt with its split assigned."""
    base = router_dir(data_dir)
    missing = [name for name in DATA_FILES if not (base / name).is_file()]
    if missing:
        raise FileNotFoundError(f"router data missing under {base}: {', '.join(missing)}; "
                                "pass --data-dir pointing at the shared data folder")
    rows = load_mmlu(base / MMLU_FILE) + load_math(base / MATH_FILE) + load_arc(base / ARC_FILE)
    assign_splits(rows)
    return rows


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _order_key(text: str, seed: str) -> str:
    return hashlib.sha256(f"{seed}\n{_normalise(text)}".encode()).hexdigest()


def assign_splits(rows: list[LabeledPrompt], seed: str = SPLIT_SEED,
                  test_fraction: float = TEST_FRACTION,
                  val_fraction: float = VAL_FRACTION) -> None:
    """Assign `split` in place: by prompt (duplicates stay together), stratified, seeded."""
    groups: dict[str, list[LabeledPrompt]] = defaultdict(list)
    for row in rows:
        groups[f"{row.source}\n{_normalise(row.text)}"].append(row)
    strata: dict[str, list[tuple[str, list[LabeledPrompt]]]] = defaultdict(list)
    for members in groups.values():
        first = members[0]
        if any(member.contaminated for member in members):
            for member in members:
                member.split = "train"
            continue
        strata[first.stratum].append((_order_key(first.text, seed), members))
    for entries in strata.values():
        entries.sort(key=lambda entry: entry[0])
        n_test = round(len(entries) * test_fraction)
        n_val = round(len(entries) * val_fraction)
        for position, (_, members) in enumerate(entries):
            split = "test" if position < n_test else "val" if position < n_test + n_val else "train"
            for member in members:
                member.split = split


def split_fingerprint(rows: Iterable[LabeledPrompt], split: str = "test") -> str:
    """SHA-256 of the sorted uids in one split: recorded in the model file, checked by the
    benchmark, so a changed split can never be evaluated silently."""
    uids = sorted(row.uid for row in rows if row.split == split)
    return hashlib.sha256("\n".join(uids).encode()).hexdigest()
