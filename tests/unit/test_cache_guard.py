import pytest

from serve_app.cache.guard import CHECKS, PairGuard

GUARD = PairGuard()


@pytest.mark.parametrize(("query", "cached", "reason"), [
    ("Is coffee good for you?", "Is coffee not good for you?", "negation"),
    ("Why can I open the file?", "Why can't I open the file?", "negation"),
    ("There's no rule on who can bat", "There's no rule on who can't bat", "negation"),
    ("What are 5 ways to save money?", "What are 6 ways to save money?", "numbers"),
    ("How do I install Python 3?", "How do I install Python?", "numbers"),
    ("Stocks close 0.39% higher", "Stocks close 2.47% higher", "numbers"),
    ("Is a 1:1 lens a macro lens?", "Is a 3:1 lens a macro lens?", "numbers"),
    ("What is the income tax rate in the US?", "What is the income tax rate in the UK?",
     "entities"),
    ("Which trains run to Berlin on Tuesday?", "Which trains run to Berlin on Wednesday?",
     "entities"),
    ("What does `get_verbosity` return?", "What does `set_verbosity` return?", "entities"),
    ("When was Einstein born?", "Where was Einstein born?", "question_type"),
    ("How do I get a refund?", "Why do I get a refund?", "question_type"),
    ("How do I reverse a list in python?", "How do I reverse a list in java?", "contrast"),
    ("Chinese shares close higher", "Chinese shares close lower", "contrast"),
    ("How do I enable the firewall?", "How do I disable the firewall?", "contrast"),
    ("A man is feeding a snake", "A snake is feeding a man", "word_order"),
    ("Is Python faster than Java?", "Is Java faster than Python?", "word_order"),
    ("cheap flights from paris to london", "cheap flights from london to paris", "word_order"),
    ("How do I convert Celsius to Fahrenheit?", "how to convert fahrenheit to celsius",
     "word_order"),
])
def test_rejects_pairs_that_ask_something_else(query, cached, reason):
    verdict = GUARD.check(query, cached)
    assert not verdict.ok
    assert verdict.reason == reason
    assert verdict.detail


@pytest.mark.parametrize(("query", "cached"), [
    ("What are five ways to save money?", "what are 5 ways to save money"),
    ("What year was Einstein born?", "When was Einstein born?"),
    ("What is the difference between cats and dogs?",
     "What is the difference between dogs and cats?"),
    ("cheap flights from paris to london", "cheap flights to london from paris"),
    ("How do I reverse a list in Python?", "In Python, how do I reverse a list?"),
    ("Why did the Greek economy collapse?", "Why did the economy of Greece collapse?"),
    ("What is the weather like in paris?", "What's the weather like in Paris?"),
    ("Is the U.S. economy growing?", "Is the US economy growing?"),
    ("How can I get rid of fleas whether or not I have pets?",
     "How do I get rid of fleas whether or not I have pets?"),
    ("How do I convert Celsius to Fahrenheit?", "how to convert celsius to fahrenheit"),
    ("Obama Signs Health Care Bill Into Law", "Obama signs the health care bill into law"),
])
def test_accepts_paraphrases(query, cached):
    assert GUARD.check(query, cached).ok


def test_identical_texts_pass():
    text = "How many moons does Jupiter have, and which is the largest?"
    assert GUARD.check(text, text).ok


def test_extra_detail_is_allowed_in_long_texts_but_not_in_short_questions():
    long_a = ("The bank said the offer was subject to the agreement of its senior lenders, "
              "bond holders and hedging banks, and that the board would decide by the end "
              "of the month on the final terms of the sale")
    long_b = long_a.replace("its senior lenders", "Goldman Sachs and its senior lenders")
    assert GUARD.check(long_a, long_b).ok  # extra names in a long statement
    long_c = long_a.replace("its senior lenders", "Barclays and its senior lenders")
    assert GUARD.check(long_b, long_c).reason == "entities"  # a swapped name always counts
    assert not GUARD.check("Who founded the bank?", "Who founded the bank Goldman?").ok


def test_checks_can_be_chosen_and_unknown_ones_are_refused():
    only_numbers = PairGuard(["numbers"])
    assert only_numbers.check("Is coffee good?", "Is coffee not good?").ok
    assert not only_numbers.check("top 5 films", "top 10 films").ok
    with pytest.raises(ValueError, match="unknown guard checks"):
        PairGuard(["negation", "vibes"])
    assert set(PairGuard().checks) == set(CHECKS)


def test_short_text_limit_decides_whether_additions_count():
    strict = PairGuard(short_text_tokens=50)
    lenient = PairGuard(short_text_tokens=2)
    query, cached = "How do I install Python 3 on Windows?", "How do I install Python on Windows?"
    assert not strict.check(query, cached).ok
    assert lenient.check(query, cached).ok
