"""A cheap lexical guard against semantic-cache false hits.

Sentence embeddings put a question and its reversal, its negation or the same question
about another number, place or person close together ("flights from Paris to London" and
"flights from London to Paris" score above 0.9). The guard looks at the two texts of a
candidate pair after the cosine test and rejects the pair when they differ in something
that changes the answer:

- negation          the texts hold a different number of negations ("not", "never",
                    "n't", "no"): "can be" vs "can't be", "no rule ... can" vs "... can't"
- numbers           each text has a number the other lacks ("five" == "5", counted with
                    repetition: "1:1" vs "3:1"); in two short
                    texts (questions) one extra number is enough ("Python 3" vs "Python")
- entities          the same for proper nouns, acronyms and code identifiers ("UK" vs
                    "US", "Tuesday" vs "Wednesday", `get_verbosity` vs `set_verbosity`);
                    an inflected form counts as present ("Greece" ~ "Greek")
- question_type     both ask a specific question type and they differ (when vs where,
                    how vs why); "what"/"which" are open and match any type
- contrast          each text holds a different member of a contrast set (higher/lower,
                    man/woman, Monday/Friday, buy/sell, ...), which the other lacks
- word_order        two content words trade places ("dog bites man" / "man bites dog";
                    "X and Y" / "Y and X" is allowed), or, in short texts, two shared words
                    swap sides of from/to/into/than ("flights from Paris to London" vs
                    "London to Paris flights", "is X faster than Y" vs "is Y faster than X")

Pure functions over linear-time patterns (serve_app.textmatch) and small word lists: a
check takes microseconds, and the analysis of a text is memoised because cached prompts
recur.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from serve_app import textmatch

CHECKS = ("negation", "numbers", "entities", "question_type", "contrast", "word_order")

# Linear-time patterns (serve_app.textmatch): the texts are prompts.
_TOKEN = textmatch.compile(r"[A-Za-z0-9_]+(?:['’][A-Za-z]+)?")
_NUMBER = textmatch.compile(r"\d+(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")
_CODE_SPAN = textmatch.compile(r"`([^`]+)`")
_SENTENCE_BREAK = set(".!?:;\"\n(“[")
_DOTTED_ACRONYM = textmatch.compile(r"\b(?:[A-Z]\.){2,}")
_ANSWER_NO = textmatch.compile(r"\s*no\s*[,.;!]", ignore_case=True)
_NOT_NAMES = frozenset({"I", "I'm", "I've", "I'd", "I'll", "OK"})

_NEGATIONS = frozenset({
    "not", "no", "never", "none", "nobody", "nothing", "nowhere", "neither", "nor",
    "cannot", "dont", "doesnt", "didnt", "isnt", "arent", "wasnt", "werent",
    "cant", "couldnt", "shouldnt", "wouldnt", "wont", "havent", "hasnt", "hadnt", "aint",
    "mustnt", "neednt",
})
_NUMBER_WORDS = {
    "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
    "eighty": 80, "ninety": 90, "second": 2, "third": 3, "fourth": 4, "fifth": 5,
    "sixth": 6, "seventh": 7, "eighth": 8, "ninth": 9, "tenth": 10,
}
# "one", "first", "single", "once" are left out: far more often "one of", "at first", "in a
# single line" than a count. Magnitudes (hundred, thousand, million) are a contrast set.

_SPECIFIC_QUESTIONS = {"when": "time", "where": "place", "who": "person", "whom": "person",
                       "whose": "person", "why": "reason"}
_HOW_QUESTIONS = {"many": "quantity", "much": "quantity", "long": "duration",
                  "old": "age", "far": "distance", "often": "frequency", "come": "reason",
                  "big": "size", "tall": "size", "large": "size", "fast": "speed"}

_ROLE_PREPOSITIONS = {"from": "source", "to": "target", "into": "target", "onto": "target",
                      "towards": "target", "toward": "target", "than": "comparison"}
_SYMMETRIC_LINKS = frozenset({"and", "or", "vs", "versus", "nor", "plus", "the", "a", "an",
                              "between", "both", "either", "neither"})
_STOPWORDS = frozenset({
    "the", "a", "an", "and", "or", "but", "of", "in", "on", "at", "for", "with", "by", "is",
    "are", "was", "were", "be", "been", "do", "does", "did", "i", "you", "he", "she", "it",
    "we", "they", "me", "my", "your", "his", "her", "its", "our", "their", "this", "that",
    "there", "what", "which", "who", "how", "why", "when", "where", "can", "could",
    "should", "would", "will", "to", "from", "as", "so", "if", "not", "no", "there",
})
STOPWORDS = _STOPWORDS  # function words; the pair verifier compares the other words

_NO_STEM = frozenset({"does", "goes", "yes", "thus", "plus", "news", "always", "perhaps",
                      "series", "species", "whereas"})
_SKIP_AFTER_PREPOSITION = frozenset({
    "the", "a", "an", "my", "your", "his", "her", "its", "our", "their", "this", "that",
    "these", "those", "some", "any", "each", "every",
})
# Sets of mutually exclusive words: a pair in which each text holds a member of one set
# that the other text lacks is about different things.
_CONTRAST_SETS: tuple[tuple[str, ...], ...] = (
    ("increase", "decrease"), ("increase", "reduce"), ("raise", "lower"),
    ("rise", "fall"), ("gain", "lose"), ("win", "lose"), ("up", "down"),
    ("high", "low"), ("higher", "lower"), ("highest", "lowest"),
    ("big", "small"), ("bigger", "smaller"), ("biggest", "smallest"),
    ("large", "small"), ("larger", "smaller"), ("largest", "smallest"),
    ("long", "short"), ("longer", "shorter"), ("longest", "shortest"),
    ("fast", "slow"), ("faster", "slower"), ("fastest", "slowest"),
    ("cheap", "expensive"), ("cheaper", "costlier"), ("cheapest", "priciest"),
    ("good", "bad"), ("better", "worse"), ("best", "worst"),
    ("more", "less"), ("more", "fewer"), ("most", "least"),
    ("max", "min"), ("maximum", "minimum"), ("maximize", "minimize"),
    ("first", "last"), ("before", "after"), ("with", "without"),
    ("hundred", "thousand", "million", "billion", "trillion"), ("early", "late"), ("earlier", "later"),
    ("old", "new"), ("older", "newer"), ("oldest", "newest"),
    ("hot", "cold"), ("warm", "cool"), ("wet", "dry"), ("light", "heavy"),
    ("easy", "hard"), ("easy", "difficult"), ("easier", "harder"),
    ("strong", "weak"), ("stronger", "weaker"), ("safe", "dangerous"),
    ("true", "false"), ("right", "wrong"), ("correct", "incorrect"),
    ("positive", "negative"), ("pros", "cons"), ("advantages", "disadvantages"),
    ("benefits", "risks"), ("same", "different"), ("similar", "different"),
    ("buy", "sell"), ("buying", "selling"), ("lend", "borrow"), ("give", "take"),
    ("send", "receive"), ("import", "export"), ("upload", "download"),
    ("push", "pull"), ("encrypt", "decrypt"), ("encode", "decode"),
    ("compress", "decompress"), ("install", "uninstall"), ("enable", "disable"),
    ("open", "close"), ("start", "stop"), ("start", "end"), ("begin", "end"),
    ("add", "remove"), ("add", "delete"), ("insert", "delete"), ("create", "delete"),
    ("include", "exclude"), ("accept", "reject"), ("allow", "deny"), ("allow", "block"),
    ("enter", "exit"), ("arrive", "depart"), ("arrival", "departure"),
    ("input", "output"), ("read", "write"), ("load", "save"),
    ("love", "hate"), ("like", "dislike"), ("agree", "disagree"), ("legal", "illegal"),
    ("possible", "impossible"), ("visible", "invisible"), ("above", "below"),
    ("inside", "outside"), ("internal", "external"), ("left", "right"), ("top", "bottom"),
    ("front", "back"), ("forward", "backward"), ("ascending", "descending"),
    ("upper", "lower"), ("uppercase", "lowercase"), ("success", "failure"),
    ("succeed", "fail"), ("pass", "fail"), ("online", "offline"), ("sync", "async"),
    ("synchronous", "asynchronous"), ("public", "private"), ("rich", "poor"),
    ("man", "woman"), ("men", "women"), ("boy", "girl"), ("boys", "girls"),
    ("male", "female"), ("he", "she"), ("his", "her"), ("him", "her"),
    ("husband", "wife"), ("father", "mother"), ("son", "daughter"),
    ("brother", "sister"), ("king", "queen"), ("uncle", "aunt"),
    ("north", "south", "east", "west"), ("northern", "southern", "eastern", "western"),
    ("spring", "summer", "autumn", "winter"), ("morning", "afternoon", "evening", "night"),
    ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"),
    ("january", "february", "march", "april", "june", "july", "august", "september",
     "october", "november", "december"),
    ("today", "tomorrow", "yesterday"), ("daily", "weekly", "monthly", "yearly"),
    ("red", "blue", "green", "yellow", "black", "white", "brown", "gray", "grey",
     "orange", "purple", "pink", "tan"),
    ("minute", "hour", "day", "week", "month", "year"),
    ("minutes", "hours", "days", "weeks", "months", "years"),
    ("celsius", "fahrenheit", "kelvin"), ("kilometers", "miles"), ("km", "mi"),
    ("kg", "lb"), ("kilograms", "pounds"), ("meters", "feet"), ("inches", "centimeters"),
    ("dollars", "euros", "pounds", "yen"), ("usd", "eur", "gbp", "jpy"),
    ("windows", "linux", "macos", "android", "ios"),
    ("python", "java", "javascript", "typescript", "rust", "ruby", "php", "kotlin",
     "swift", "golang", "scala", "perl", "haskell"),
    ("mysql", "postgresql", "postgres", "sqlite", "mongodb", "redis", "oracle"),
)
# Treat "grey"/"gray" and a few spelling variants as one word.
_SPELLING = {"grey": "gray", "postgres": "postgresql", "colour": "color"}


@dataclass(frozen=True)
class GuardVerdict:
    ok: bool
    reason: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class TextFeatures:
    stems: frozenset[str]
    negations: int
    numbers: tuple[str, ...]  # sorted, with repetitions
    entities: frozenset[str]
    question_types: frozenset[str]
    roles: tuple[tuple[str, str, int], ...]  # (stem, role, index of the preposition)
    contrasts: frozenset[tuple[int, int]]  # (contrast set, member) present
    positions: dict[str, tuple[int, ...]]  # stem -> token indexes
    sequence: tuple[str, ...]  # stems in order
    length: int  # tokens


class PairGuard:
    """`check(query, cached)` -> GuardVerdict.

    checks: which tests run (default all of CHECKS). short_text_tokens: texts up to this
    many tokens are treated as fully specified questions, where one extra number or name
    in one of them is already a different question.
    """

    def __init__(self, checks: Iterable[str] | None = None, *,
                 short_text_tokens: int = 20) -> None:
        chosen = tuple(CHECKS if checks is None else checks)
        unknown = set(chosen) - set(CHECKS)
        if unknown:
            raise ValueError(f"unknown guard checks {sorted(unknown)}; known: {list(CHECKS)}")
        self.checks = chosen
        self.short_text_tokens = short_text_tokens

    def check(self, query: str, cached: str) -> GuardVerdict:
        a, b = analyze(query), analyze(cached)
        short = max(a.length, b.length) <= self.short_text_tokens
        for name in self.checks:
            detail = _CHECKS[name](a, b, short)
            if detail is not None:
                return GuardVerdict(False, name, detail)
        return GuardVerdict(True)


@lru_cache(maxsize=8192)
def analyze(text: str) -> TextFeatures:
    text = _DOTTED_ACRONYM.sub(lambda m: m.group(0).replace(".", ""), text)
    tokens = [(m.group(0), _sentence_start(text, m.start())) for m in _TOKEN.finditer(text)]
    lowered = [_normalise_word(tok) for tok, _ in tokens]
    stems = [stem(word) for word in lowered]
    contrasts = [pair for word in lowered for pair in _CONTRAST_INDEX.get(word, ())]
    positions: dict[str, list[int]] = {}
    for index, word_stem in enumerate(stems):
        positions.setdefault(word_stem, []).append(index)
    return TextFeatures(
        stems=frozenset(stems),
        negations=_negations(lowered, _ANSWER_NO.match(text) is not None),
        numbers=_numbers(text, lowered),
        entities=_entities(text, tokens, stems),
        question_types=_question_types(lowered),
        roles=_roles(lowered, stems),
        contrasts=frozenset(contrasts),
        positions={key: tuple(value) for key, value in positions.items()},
        sequence=tuple(stems),
        length=len(tokens),
    )


@lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """Tiny, consistent stemmer: lower case, possessives and plural -s only."""
    word = word.lower().replace("’", "'")
    if word.endswith("'s"):
        word = word[:-2]
    word = word.rstrip("'")
    if word in _NO_STEM:
        return word
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _normalise_word(token: str) -> str:
    word = token.lower().replace("’", "'")
    return _SPELLING.get(word, word)


def _negations(words: list[str], leading_no: bool) -> int:
    count = 0
    for index, word in enumerate(words):
        if index == 0 and leading_no:
            continue  # an answer's "No, ..." negates nothing that was asked
        bare = word.replace("'", "")
        if word.endswith("n't") or bare in _NEGATIONS:
            if bare == "not":
                before = words[index - 1] if index else ""
                after = words[index + 1] if index + 1 < len(words) else ""
                if before == "or" or after in ("only", "just"):  # "whether or not", "not only"
                    continue
            if bare == "no" and index + 1 < len(words) and words[index + 1] == "doubt":
                continue
            count += 1
    return count


def _numbers(text: str, words: list[str]) -> tuple[str, ...]:
    found = [_canonical_number(m.group(0)) for m in _NUMBER.finditer(text)]
    for index, word in enumerate(words):
        value = _NUMBER_WORDS.get(word)
        if value is None:
            continue
        if word == "second" and not (index and words[index - 1] == "the"):
            continue  # "wait a second", "second-hand": keep only "the second X"
        found.append(str(value))
    return tuple(sorted(found))


def _canonical_number(raw: str) -> str:
    whole, _, fraction = raw.replace(",", "").partition(".")
    whole = whole.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    return f"{whole}.{fraction}" if fraction else whole


def _entities(text: str, tokens: list[tuple[str, bool]], stems: list[str]) -> frozenset[str]:
    """Proper nouns (capitalised mid-sentence), acronyms and code identifiers, as stems.

    In Title Case or ALL CAPS text capitalisation says nothing, so only identifiers count.
    """
    found = {stem(t) for span in _CODE_SPAN.findall(text) for t in _TOKEN.findall(span)}
    alpha = [tok for tok, start in tokens if not start and tok[0].isalpha()]
    capitalised = sum(tok[0].isupper() for tok in alpha)
    shouting = sum(tok.isupper() for tok in alpha) > 0.5 * max(1, len(alpha))
    title_case = len(alpha) >= 3 and capitalised > 0.5 * len(alpha)
    for (tok, start), tok_stem in zip(tokens, stems):
        if tok.islower() or tok.isdigit():
            continue
        rest = tok[1:]
        if ("_" in tok.strip("_")) or (rest != rest.lower() and tok != tok.upper()):
            found.add(tok_stem)  # snake_case, camelCase, PyTorch, iPhone
        elif shouting or tok in _NOT_NAMES:
            continue
        elif len(tok) >= 2 and tok.isalpha() and tok.isupper():
            found.add(tok_stem)  # acronym
        elif not title_case and not start and tok[0].isupper():
            found.add(tok_stem)
    return frozenset(found)


def _sentence_start(text: str, position: int) -> bool:
    index = position - 1
    while index >= 0 and text[index] in " \t\r'‘*-–—>#":
        index -= 1
    return index < 0 or text[index] in _SENTENCE_BREAK


def _question_types(words: list[str]) -> frozenset[str]:
    found: set[str] = set()
    for index, word in enumerate(words):
        if word in _SPECIFIC_QUESTIONS:
            found.add(_SPECIFIC_QUESTIONS[word])
        elif word == "how":
            following = words[index + 1] if index + 1 < len(words) else ""
            found.add(_HOW_QUESTIONS.get(following, "manner"))
    return frozenset(found)


def _roles(words: list[str], stems: list[str]) -> tuple[tuple[str, str, int], ...]:
    """The first content word after from/to/into/than, with that role."""
    roles: list[tuple[str, str, int]] = []
    pending: tuple[str, int] | None = None
    for index, (word, word_stem) in enumerate(zip(words, stems)):
        if word in _ROLE_PREPOSITIONS:
            pending = (_ROLE_PREPOSITIONS[word], index)
            continue
        if pending is None or word in _SKIP_AFTER_PREPOSITION:
            continue
        roles.append((word_stem, pending[0], pending[1]))
        pending = None
    return tuple(roles)


# ---- the checks: each returns a short detail when the pair must be rejected -------------

def _check_negation(a: TextFeatures, b: TextFeatures, short: bool) -> str | None:
    if a.negations != b.negations:
        return f"{a.negations} vs {b.negations} negations"
    return None


def _check_numbers(a: TextFeatures, b: TextFeatures, short: bool) -> str | None:
    count_a, count_b = Counter(a.numbers), Counter(b.numbers)
    only_a, only_b = count_a - count_b, count_b - count_a
    if (only_a and only_b) or (short and (only_a or only_b)):
        return f"{sorted(a.numbers)} vs {sorted(b.numbers)}"
    return None


def _check_entities(a: TextFeatures, b: TextFeatures, short: bool) -> str | None:
    only_a = sorted(e for e in a.entities if not _present(e, b))
    only_b = sorted(e for e in b.entities if not _present(e, a))
    if (only_a and only_b) or (short and (only_a or only_b)):
        return f"{', '.join(only_a[:3]) or '-'} vs {', '.join(only_b[:3]) or '-'}"
    return None


def entity_present(entity: str, other: TextFeatures) -> bool:
    """An entity of one text found in the other (the pair verifier counts the rest)."""
    return _present(entity, other)


def _present(entity: str, other: TextFeatures) -> bool:
    """In the other text, or an inflection of it there (Greece/Greek, Syria/Syrian)."""
    if entity in other.stems:
        return True
    if len(entity) < 4 or not entity.isalpha():
        return False  # identifiers (list_metrics, gpt4) must match exactly
    for word in other.stems:
        shared = len(_common_prefix(entity, word))
        if shared >= 4 and shared >= min(len(entity), len(word)) - 1:
            return True
    return False


def _common_prefix(a: str, b: str) -> str:
    size = 0
    for x, y in zip(a, b):
        if x != y:
            break
        size += 1
    return a[:size]


def _check_question_type(a: TextFeatures, b: TextFeatures, short: bool) -> str | None:
    if a.question_types and b.question_types and a.question_types != b.question_types:
        return f"{sorted(a.question_types)} vs {sorted(b.question_types)}"
    return None


def _check_contrast(a: TextFeatures, b: TextFeatures, short: bool) -> str | None:
    only_a = a.contrasts - b.contrasts
    only_b = b.contrasts - a.contrasts
    for group, member in sorted(only_a):
        other = next((m for g, m in sorted(only_b) if g == group), None)
        if other is not None:
            return f"{_CONTRAST_SETS[group][member]} vs {_CONTRAST_SETS[group][other]}"
    return None


_SWAP_WINDOW = 6  # tokens before a preposition that count as "its left side"


def _check_word_order(a: TextFeatures, b: TextFeatures, short: bool) -> str | None:
    return _transposition(a.sequence, b.sequence) or (_direction(a, b) if short else None)


def _transposition(a: tuple[str, ...], b: tuple[str, ...]) -> str | None:
    """The same words, two content words exchanged: "a dog bit a man" / "a man bit a dog"."""
    if len(a) != len(b) or a == b:
        return None
    differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if len(differ) != 2:
        return None
    i, j = differ
    if a[i] != b[j] or a[j] != b[i] or a[i] in _STOPWORDS or a[j] in _STOPWORDS:
        return None
    if set(a[i + 1:j]) <= _SYMMETRIC_LINKS:
        return None  # "cats and dogs" / "dogs and cats"
    return f"'{a[i]}' and '{a[j]}' trade places"


def _direction(a: TextFeatures, b: TextFeatures) -> str | None:
    """x follows the preposition in one text and precedes it in the other, and y the
    other way round: "from Paris to London" / "from London to Paris". Short texts only:
    in long ones the words near a "to" are too often unrelated."""
    for first, second in ((a, b), (b, a)):
        for x, role, prep_first in first.roles:
            for y, role_other, prep_second in second.roles:
                if role_other != role or x == y:
                    continue
                if (_left_of(y, prep_first, first) and _left_of(x, prep_second, second)
                        and x in second.positions and y in first.positions):
                    return f"'{x}' and '{y}' swap sides of the {role} preposition"
    return None


def _left_of(word: str, preposition: int, text: TextFeatures) -> bool:
    return any(preposition - _SWAP_WINDOW <= index < preposition
               for index in text.positions.get(word, ()))


def _expand(word: str) -> set[str]:
    forms = {word, word + "s", word + "es", word + "ed", word + "d", word + "ing"}
    if word.endswith("e"):
        forms.add(word[:-1] + "ing")
    if word.endswith("y"):
        forms |= {word[:-1] + "ies", word[:-1] + "ied"}
    return forms


def _build_contrast_index() -> dict[str, tuple[tuple[int, int], ...]]:
    """word form -> the (set, member) pairs it stands for."""
    index: dict[str, set[tuple[int, int]]] = {}
    for group, members in enumerate(_CONTRAST_SETS):
        for member, word in enumerate(members):
            for form in _expand(word):
                index.setdefault(form, set()).add((group, member))
    return {form: tuple(sorted(pairs)) for form, pairs in index.items()}


_CONTRAST_INDEX = _build_contrast_index()

_CHECKS = {
    "negation": _check_negation,
    "numbers": _check_numbers,
    "entities": _check_entities,
    "question_type": _check_question_type,
    "contrast": _check_contrast,
    "word_order": _check_word_order,
}
