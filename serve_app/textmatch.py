"""Linear-time pattern matching for untrusted text (prompts, documents, model output).

Python's `re` backtracks: `[\\s?.!]+$` over 40k "!" and one letter, or `<!--.*?-->` over
repeated "<!--", takes time quadratic in the input. Every pattern that sees user, document
or model text is compiled here with RE2 (`google-re2`), whose matching time is linear.

Patterns are written in Python syntax and match exactly what Python's `re` would match:

- `\\w \\W \\d \\D \\s \\S` are expanded into the code point ranges Python itself uses
  (RE2's are ASCII only), computed once from `re` over a constant string of all code points;
- `ignore_case` expands each ASCII letter into the characters Python folds to it
  (RE2 folds "i" differently: Python also matches "İ" and "ı");
- `\\b` is Unicode in Python and ASCII in RE2, so texts matched by a pattern with `\\b` are
  first mapped to an equal-length "ASCII view" (non-ASCII word characters become "_",
  non-ASCII spaces " "); spans and groups are always taken from the original text;
- non-multiline `$` also matches before a final newline, as in Python;
- lone surrogates (valid in a Python str, not in UTF-8) match as U+FFFD.

Not supported (RE2 has none, rewrite in plain string code): lookaround, backreferences.
"""
from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import re2

# Characters Python's IGNORECASE matches to an ASCII letter besides its two cases
# (checked against `re` in tests/security/test_text_regex.py).
_FOLD_EXTRAS = {"i": "\u0130\u0131", "k": "\u212a", "s": "\u017f"}
_SURROGATES = {code: 0xFFFD for code in range(0xD800, 0xE000)}
_CLASS_ESCAPES = "wWdDsS"


class Match:
    """A match over the original text (same API subset as `re.Match`)."""

    __slots__ = ("_text", "_spans")

    def __init__(self, text: str, spans: list[tuple[int, int]]) -> None:
        self._text = text
        self._spans = spans

    def span(self, group: int = 0) -> tuple[int, int]:
        return self._spans[group]

    def start(self, group: int = 0) -> int:
        return self._spans[group][0]

    def end(self, group: int = 0) -> int:
        return self._spans[group][1]

    def group(self, group: int = 0) -> Any:  # str, or None for a group that did not take part
        start, end = self._spans[group]
        return None if start < 0 else self._text[start:end]


class Pattern:
    """A Python-syntax pattern matched in linear time. Compiled on first use, so
    importing a module that defines patterns costs nothing."""

    def __init__(self, pattern: str, *, ignore_case: bool = False, multiline: bool = False,
                 dotall: bool = False) -> None:
        self.pattern = pattern
        self.ignore_case = ignore_case
        self.multiline = multiline
        self.dotall = dotall
        self.ascii_view = r"\b" in pattern.replace("\\\\", "")
        if self.ascii_view and ("_" in pattern or not pattern.isascii()):
            raise ValueError("a pattern with \\b may not contain '_' or non-ASCII characters "
                             "(its texts are matched through the ASCII view)")
        self._compiled: re2._Regexp | None = None
        self._lock = threading.Lock()

    @property
    def groups(self) -> int:
        return self._regexp().groups

    # ------------------------------------------------------------------ matching
    def finditer(self, text: str) -> Iterator[Match]:
        regexp = self._regexp()
        groups = range(regexp.groups + 1)
        for found in regexp.finditer(self._prepare(text)):
            yield Match(text, [found.span(g) for g in groups])

    def search(self, text: str) -> Match | None:
        return next(self.finditer(text), None)

    def match(self, text: str) -> Match | None:
        return self._anchored(self._regexp().match, text)

    def fullmatch(self, text: str) -> Match | None:
        return self._anchored(self._regexp().fullmatch, text)

    def findall(self, text: str) -> list[str]:
        """Group 1 when the pattern has groups (as `re.findall` with one group), else
        the whole match."""
        if self.groups > 1:
            raise ValueError("findall of a pattern with several groups: use finditer")
        group = 1 if self.groups else 0
        return [found.group(group) or "" for found in self.finditer(text)]

    def count(self, text: str) -> int:
        return sum(1 for _ in self.finditer(text))

    def sub(self, repl: str | Callable[[Match], str], text: str) -> str:
        """Replace every match; a str `repl` is literal (no group references)."""
        parts: list[str] = []
        last = 0
        for found in self.finditer(text):
            start, end = found.span()
            parts.append(text[last:start])
            parts.append(repl if isinstance(repl, str) else repl(found))
            last = end
        parts.append(text[last:])
        return "".join(parts)

    def split(self, text: str, group: int = 0) -> list[str]:
        """The pieces between matches; with `group`, cut at that group's span only (what a
        lookbehind did: `(?<=[.!?])\\s+` is `[.!?](\\s+)` split at group 1)."""
        pieces: list[str] = []
        last = 0
        for found in self.finditer(text):
            start, end = found.span(group)
            pieces.append(text[last:start])
            last = end
        pieces.append(text[last:])
        return pieces

    # ------------------------------------------------------------------ internals
    def _anchored(self, method: Callable[[str], object], text: str) -> Match | None:
        found = method(self._prepare(text))
        if found is None:
            return None
        spans = [found.span(g) for g in range(self.groups + 1)]  # type: ignore[attr-defined]
        return Match(text, spans)

    def _prepare(self, text: str) -> str:
        if not text.isascii():
            text = _without_surrogates(text)
        if self.ascii_view:
            text = _ascii_view(text, self.ignore_case)
        return text

    def _regexp(self) -> re2._Regexp:
        if self._compiled is None:
            with self._lock:
                if self._compiled is None:
                    self._compiled = re2.compile(self._translate())
        return self._compiled

    def _translate(self) -> str:
        flags = ("m" if self.multiline else "") + ("s" if self.dotall else "")
        body = translate(self.pattern, ignore_case=self.ignore_case,
                         multiline=self.multiline)
        return f"(?{flags}){body}" if flags else body


def compile(pattern: str, *, ignore_case: bool = False, multiline: bool = False,
            dotall: bool = False) -> Pattern:
    return Pattern(pattern, ignore_case=ignore_case, multiline=multiline, dotall=dotall)


def translate(pattern: str, *, ignore_case: bool = False, multiline: bool = False) -> str:
    """Python pattern syntax -> RE2 syntax with Python's meaning (see the module doc)."""
    out: list[str] = []
    in_class = False
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\" and index + 1 < len(pattern):
            escaped = pattern[index + 1]
            index += 2
            if escaped in _CLASS_ESCAPES:
                ranges = _class_ranges(escaped)
                out.append(ranges if in_class else f"[{ranges}]")
            elif escaped in "AZ":
                out.append(r"\A" if escaped == "A" else r"\z")
            else:
                out.append(char + escaped)
            continue
        index += 1
        if in_class:
            if char == "]" and not _class_start(out):
                in_class = False
            elif ignore_case and char.isascii() and char.isalpha():
                if pattern[index:index + 1] == "-" or out[-1:] == ["-"]:
                    raise ValueError("letter ranges are not supported with ignore_case")
                char = _case_variants(char)
            out.append(char)
        elif char == "[":
            in_class = True
            out.append(char)
            if pattern[index:index + 1] == "^":
                out.append("^")
                index += 1
        elif char == "$" and not multiline:
            out.append(r"(?:\n?\z)")  # Python's `$`: the end, or before a final newline
        elif ignore_case and char.isascii() and char.isalpha():
            out.append(f"[{_case_variants(char)}]")
        else:
            out.append(char)
    return "".join(out)


def _class_start(out: list[str]) -> bool:
    """A "]" right after "[" or "[^" is a literal."""
    return out[-1:] == ["["] or out[-2:] == ["[", "^"]


def _case_variants(letter: str) -> str:
    lower = letter.lower()
    return lower + lower.upper() + _FOLD_EXTRAS.get(lower, "")


@cache
def _class_ranges(escape: str) -> str:
    """The code points Python's `\\w` (etc.) matches, as RE2 class ranges."""
    parts = []
    for match in re.finditer(f"\\{escape}+", _all_code_points()):  # constant text: safe
        first, last = ord(match.group()[0]), ord(match.group()[-1])
        parts.append(_escape(first) if first == last else f"{_escape(first)}-{_escape(last)}")
    return "".join(parts)


@cache
def _all_code_points() -> str:
    return "".join(map(chr, range(0x110000)))


def _escape(code: int) -> str:
    return f"\\x{{{code:x}}}"


def _without_surrogates(text: str) -> str:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.translate(_SURROGATES)  # same length, so spans still fit the original


class _AsciiView(dict):  # type: ignore[type-arg]
    """str.translate table for `_ascii_view`, computed per character (not stored: a
    hostile text could otherwise fill it with a million entries)."""

    def __init__(self, fold: bool) -> None:
        super().__init__({code: " " for code in (0x0B, 0x1C, 0x1D, 0x1E, 0x1F)})
        self.fold = fold
        self.extras = {extra: letter for letter, extras in _FOLD_EXTRAS.items()
                       for extra in extras}

    def __missing__(self, code: int) -> str | int:
        if code < 0x80:
            return code
        char = chr(code)
        if self.fold and char in self.extras:
            return self.extras[char]
        if char.isalnum():  # Python's \w (with "_"), which is what \b looks at
            return "_"
        if char.isspace():
            return " "
        return code


_VIEWS = {True: _AsciiView(True), False: _AsciiView(False)}


def _ascii_view(text: str, fold: bool) -> str:
    """Same length as `text`; RE2's ASCII `\\b`, `\\s` and case folding see in it what
    Python's Unicode ones see in `text`."""
    return text.translate(_VIEWS[fold])
