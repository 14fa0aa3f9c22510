"""Cheap text features and the text the router judges."""
from __future__ import annotations

import numpy as np

from serve_app.routing.features import (
    FEATURE_NAMES,
    MAX_CHARS,
    batch_features,
    routing_text,
    text_features,
)


def feature(text: str, name: str) -> float:
    return float(text_features(text)[FEATURE_NAMES.index(name)])


def test_shape_and_dtype():
    vector = text_features("What is the capital of France?")
    assert vector.shape == (len(FEATURE_NAMES),) and vector.dtype == np.float32
    assert batch_features(["a", "b c"]).shape == (2, len(FEATURE_NAMES))
    assert batch_features([]).shape == (0, len(FEATURE_NAMES))
    assert np.all(np.isfinite(text_features("")))


def test_length_grows_with_text():
    assert feature("hi", "log_chars") < feature("hi " * 200, "log_chars")
    assert feature("one two three", "log_words") == np.float32(np.log1p(3))
    assert feature("a\nb\nc", "log_lines") == np.float32(np.log1p(3))


def test_maths_markers():
    maths = r"Evaluate $\int_0^1 x^2 \, dx$ and prove that \frac{a}{b} = 2."
    plain = "Tell me about the history of the Roman empire"
    assert feature(maths, "latex_commands") > 0 and feature(plain, "latex_commands") == 0
    assert feature(maths, "math_symbol_ratio") > feature(plain, "math_symbol_ratio")
    assert feature(maths, "hard_verbs") > 0 and feature(plain, "hard_verbs") == 0
    assert feature("Compute 12345 * 678", "digit_ratio") > 0.3


def test_code_markers():
    code = "```python\ndef add(a, b):\n    return a + b\n```\nWhy does this fail?"
    assert feature(code, "code_markers") > feature("Why is the sky blue?", "code_markers")


def test_question_words_and_easy_verbs():
    assert feature("What is 2+2?", "starts_with_question_word") == 1.0
    assert feature("  how do magnets work", "starts_with_question_word") == 1.0
    assert feature("Prove Fermat's little theorem", "starts_with_question_word") == 0.0
    assert feature("hello there, thanks!", "easy_verbs") > 0
    assert feature("What is 2+2?", "question_marks") > 0


def test_multiple_choice_lines():
    prompt = "Which is a prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer:"
    assert feature(prompt, "choice_lines") == np.float32(np.log1p(4))


def test_long_inputs_are_truncated():
    huge = "x" * (MAX_CHARS * 3)
    assert feature(huge, "log_chars") == np.float32(np.log1p(MAX_CHARS))


def test_routing_text_is_the_last_user_message():
    messages = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "an answer"},
                {"role": "user", "content": [{"type": "text", "text": "second "},
                                             {"type": "text", "text": "question"}]}]
    assert routing_text(messages) == "second question"
    assert routing_text([{"role": "system", "content": "only system"}]) == "only system"
    assert routing_text([{"role": "assistant", "content": "a"},
                         {"role": "user", "content": None}]) == "a\n"
