"""Pure chunking: parsed blocks -> overlapping chunks that stay inside one section.

A chunk never spans two sections (a heading starts a new chunk); a section longer than a
chunk is cut at paragraph, then sentence, then token boundaries, and consecutive chunks of
one section share `overlap_tokens` tokens. Sizes are estimated tokens (`count_tokens`): a
word, a punctuation mark or one CJK character each, close to a WordPiece count for English
without needing the embedding model's tokenizer.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby

from serve_app import textmatch
from serve_app.rag.parsing import Block

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
# Linear-time patterns (serve_app.textmatch): the text is an uploaded document.
_TOKEN = textmatch.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")
# Was the lookbehind `(?<=[.!?。！？])\s+` (RE2 has none): split at group 1 instead.
_SENTENCE_END = textmatch.compile("[.!?\u3002\uff01\uff1f](\\s+)")
HEADING_SEPARATOR = " > "


def count_tokens(text: str) -> int:
    return _TOKEN.count(text)


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    headings: tuple[str, ...]
    page: int | None
    n_tokens: int

    @property
    def heading(self) -> str:
        return HEADING_SEPARATOR.join(self.headings)


@dataclass(frozen=True)
class _Unit:
    text: str
    n_tokens: int
    page: int | None
    separator: str  # joins this unit to the one before it in a chunk


class Chunker:
    def __init__(self, chunk_tokens: int = 200, overlap_tokens: int = 40) -> None:
        if chunk_tokens < 2:
            raise ValueError("chunk_tokens must be at least 2")
        if not 0 <= overlap_tokens * 2 <= chunk_tokens:
            raise ValueError("overlap_tokens must be between 0 and chunk_tokens / 2")
        self.size = chunk_tokens
        self.overlap = overlap_tokens

    def split(self, blocks: Sequence[Block]) -> list[Chunk]:
        chunks: list[Chunk] = []
        for headings, section in groupby(blocks, key=lambda block: block.headings):
            for text, page, n_tokens in self._pack(self._units(section)):
                chunks.append(Chunk(len(chunks), text, headings, page, n_tokens))
        return chunks

    # ------------------------------------------------------------------ internals
    def _units(self, blocks: Iterable[Block]) -> list[_Unit]:
        """Paragraphs that fit; otherwise their sentences; otherwise token windows."""
        units: list[_Unit] = []
        window = self.size - self.overlap  # leaves room for the overlap in front
        for block in blocks:
            text = block.text.strip()
            if not text:
                continue
            n_tokens = count_tokens(text)
            if n_tokens <= self.size:
                units.append(_Unit(text, n_tokens, block.page, "\n\n"))
                continue
            separator = "\n\n"
            for sentence in _SENTENCE_END.split(text, group=1):
                sentence = sentence.strip()
                if not sentence:
                    continue
                pieces = ([sentence] if count_tokens(sentence) <= window
                          else token_windows(sentence, window))
                for piece in pieces:
                    units.append(_Unit(piece, count_tokens(piece), block.page, separator))
                    separator = " "
        return units

    def _pack(self, units: list[_Unit]) -> list[tuple[str, int | None, int]]:
        out: list[tuple[str, int | None, int]] = []
        current: list[_Unit] = []
        tokens = 0
        for unit in units:  # every unit fits a chunk on its own (see _units)
            if current and tokens + unit.n_tokens > self.size:
                out.append(_join(current))
                current = self._tail(current, min(self.overlap, self.size - unit.n_tokens))
                tokens = sum(item.n_tokens for item in current)
            current.append(unit)
            tokens += unit.n_tokens
        if current:
            out.append(_join(current))
        return out

    def _tail(self, units: list[_Unit], budget: int) -> list[_Unit]:
        """The last `budget` tokens of a chunk, whole units when they fit."""
        if budget <= 0:
            return []
        tail: list[_Unit] = []
        used = 0
        for unit in reversed(units):
            if used + unit.n_tokens > budget:
                if not tail:
                    part = last_tokens(unit.text, budget)
                    tail.append(_Unit(part, count_tokens(part), unit.page, unit.separator))
                break
            tail.append(unit)
            used += unit.n_tokens
        return list(reversed(tail))


def _join(units: list[_Unit]) -> tuple[str, int | None, int]:
    parts = [units[0].text]
    for unit in units[1:]:
        parts.append(unit.separator + unit.text)
    return "".join(parts), units[0].page, sum(unit.n_tokens for unit in units)


def token_windows(text: str, size: int) -> list[str]:
    """Consecutive pieces of at most `size` tokens, cut between tokens."""
    spans = [match.span() for match in _TOKEN.finditer(text)]
    pieces = []
    for start in range(0, len(spans), size):
        group = spans[start:start + size]
        pieces.append(text[group[0][0]:group[-1][1]])
    return pieces


def last_tokens(text: str, count: int) -> str:
    spans = [match.start() for match in _TOKEN.finditer(text)]
    if count <= 0 or not spans:
        return ""
    return text[spans[max(0, len(spans) - count)]:].strip()
