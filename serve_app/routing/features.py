"""Cheap text features of a prompt (microseconds, no model): length, digits, maths, code,
question words. They complement the sentence embedding, which truncates long prompts and
does not see formatting. The names and their order are part of the model file format:
change them only with a new FEATURES_VERSION."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from serve_app import textmatch

FEATURES_VERSION = 1
MAX_CHARS = 20_000  # features of a longer prompt are computed on its first MAX_CHARS

FEATURE_NAMES: tuple[str, ...] = (
    "log_chars",
    "log_words",
    "log_lines",
    "digit_ratio",
    "math_symbol_ratio",
    "latex_commands",
    "code_markers",
    "question_marks",
    "starts_with_question_word",
    "hard_verbs",
    "easy_verbs",
    "mean_word_length",
    "upper_ratio",
    "numbers",
    "choice_lines",
)

_QUESTION_WORDS = ("what", "who", "when", "where", "which", "why", "how", "is", "are", "do",
                   "does", "can", "could", "should", "would", "will", "name", "define")
# Linear-time patterns (serve_app.textmatch): the text is a prompt.
_HARD_VERBS = textmatch.compile(
    r"\b(prove|derive|show that|evaluate|compute|calculate|solve|integrate|differentiate|"
    r"optimi[sz]e|implement|design|analy[sz]e|compare|explain why|justify|refactor|debug|"
    r"find all|determine)\b", ignore_case=True)
_EASY_VERBS = textmatch.compile(
    r"\b(hi|hello|hey|thanks|thank you|translate|spell|list|name|define|what is|who is|"
    r"capital of|tell me a joke|summari[sz]e)\b", ignore_case=True)
_MATH_SYMBOLS = textmatch.compile(r"[=+\-*/^<>≤≥≠±∑∫√π∞∂∇×÷|]")
_LATEX = textmatch.compile(r"\\[A-Za-z]+|\$")
_CODE = textmatch.compile(
    r"```|\bdef |\bclass |\breturn\b|\bimport |\bfunction\b|=>|;\s*$|\{|\}|#include|"
    r"\bSELECT\b|\bconst\b|\bpublic\b", multiline=True)
_NUMBER = textmatch.compile(r"\d+(?:[.,]\d+)?")
_CHOICE_LINE = textmatch.compile(r"^\s*\(?[A-Ea-e][.)]\s", multiline=True)
_WORD = textmatch.compile(r"\w+")


def text_features(text: str) -> np.ndarray:
    """Feature vector in FEATURE_NAMES order (float32)."""
    text = text[:MAX_CHARS]
    n_chars = len(text)
    words = _WORD.findall(text)
    n_words = len(words)
    denominator = max(n_chars, 1)
    stripped = text.lstrip().lower()
    first_word = stripped.split(maxsplit=1)[0] if stripped else ""
    first_word = first_word.strip("¿?,.!:;\"'")
    letters = [c for c in text if c.isalpha()]
    values = (
        math.log1p(n_chars),
        math.log1p(n_words),
        math.log1p(text.count("\n") + 1 if text else 0),
        sum(c.isdigit() for c in text) / denominator,
        _MATH_SYMBOLS.count(text) / denominator,
        math.log1p(_LATEX.count(text)),
        math.log1p(_CODE.count(text)),
        math.log1p(text.count("?")),
        1.0 if first_word in _QUESTION_WORDS else 0.0,
        math.log1p(_HARD_VERBS.count(text)),
        math.log1p(_EASY_VERBS.count(text)),
        (sum(len(w) for w in words) / n_words) if n_words else 0.0,
        (sum(c.isupper() for c in letters) / len(letters)) if letters else 0.0,
        math.log1p(_NUMBER.count(text)),
        math.log1p(_CHOICE_LINE.count(text)),
    )
    return np.asarray(values, dtype=np.float32)


def batch_features(texts: Sequence[str]) -> np.ndarray:
    if not texts:
        return np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32)
    return np.stack([text_features(text) for text in texts])


def routing_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text the router judges: the last user message (system prompts and earlier turns
    are boilerplate or context, not the task). Falls back to all message texts."""
    def content(message: Mapping[str, Any]) -> str:
        value = message.get("content")
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            return "".join(str(part.get("text", "")) for part in value if isinstance(part, Mapping))
        return ""

    for message in reversed(messages):
        if message.get("role") == "user":
            text = content(message)
            if text.strip():
                return text
    return "\n".join(content(m) for m in messages)
