"""Chunking: bounded size, overlap inside a section, never across a heading."""
from __future__ import annotations

import random
import re

import pytest

from serve_app.rag.chunking import Chunker, count_tokens, last_tokens, token_windows
from serve_app.rag.parsing import Block, parse_markdown


def words(n: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def test_count_tokens_words_punctuation_and_cjk():
    assert count_tokens("Hello, world!") == 4
    assert count_tokens("naïve café") == 2
    assert count_tokens("日本語テキスト") == 7
    assert count_tokens("") == 0


def test_short_sections_become_one_chunk_each_with_their_heading_path():
    parsed = parse_markdown("# A\nalpha one.\n\nalpha two.\n\n## B\nbeta.\n\n# C\ngamma.")
    chunks = Chunker(50, 10).split(parsed.blocks)
    assert [(chunk.headings, chunk.text) for chunk in chunks] == [
        (("A",), "alpha one.\n\nalpha two."),
        (("A", "B"), "beta."),
        (("C",), "gamma."),
    ]
    assert [chunk.index for chunk in chunks] == [0, 1, 2]
    assert chunks[1].heading == "A > B"


def test_a_chunk_never_spans_two_sections_even_when_both_are_tiny():
    blocks = [Block("one", ("H1",)), Block("two", ("H2",)), Block("three", ("H2",))]
    chunks = Chunker(100, 10).split(blocks)
    assert [(chunk.headings, chunk.text) for chunk in chunks] == [
        (("H1",), "one"), (("H2",), "two\n\nthree")]


def test_long_section_is_split_with_overlap_and_bounded_size():
    sentences = [f"Sentence {i} talks about topic {i} at length." for i in range(60)]
    text = " ".join(sentences)
    chunker = Chunker(40, 10)
    chunks = chunker.split([Block(text, ("Long",))])
    assert len(chunks) > 5
    for chunk in chunks:
        assert count_tokens(chunk.text) <= 40
        assert chunk.headings == ("Long",)
    for before, after in zip(chunks, chunks[1:]):
        # The next chunk starts with the last 1..10 tokens of the previous one.
        assert any(after.text.startswith(last_tokens(before.text, k)) for k in range(1, 11))
        assert not after.text.startswith(last_tokens(before.text, 11))
    for sentence in sentences:  # nothing is lost
        assert any(sentence in chunk.text for chunk in chunks)


def test_paragraphs_are_kept_whole_when_they_fit():
    paras = [words(15, f"p{i}_") for i in range(6)]
    chunks = Chunker(40, 10).split([Block(p) for p in paras])
    for para in paras:
        assert any(para in chunk.text for chunk in chunks)


def test_giant_sentence_without_punctuation_is_cut_into_windows():
    text = words(500)
    chunks = Chunker(100, 20).split([Block(text, ("X",), page=3)])
    assert all(count_tokens(chunk.text) <= 100 for chunk in chunks)
    assert all(chunk.page == 3 for chunk in chunks)
    seen = set()
    for chunk in chunks:
        seen.update(chunk.text.split())
    assert seen == set(text.split())
    # consecutive windows share exactly the overlap
    first, second = chunks[0].text.split(), chunks[1].text.split()
    assert second[:20] == first[-20:]


def test_no_overlap_setting():
    chunks = Chunker(20, 0).split([Block(words(60))])
    assert [len(chunk.text.split()) for chunk in chunks] == [20, 20, 20]


def test_random_documents_respect_the_size_bound_and_keep_every_word():
    rng = random.Random(7)
    for _ in range(30):
        blocks = []
        for section in range(rng.randint(1, 4)):
            for _ in range(rng.randint(1, 5)):
                n = rng.randint(1, 120)
                sentence_words = [f"s{section}w{rng.randint(0, 999)}" for _ in range(n)]
                for i in range(rng.randint(0, 5)):
                    sentence_words[rng.randrange(n)] += "."
                blocks.append(Block(" ".join(sentence_words), (f"H{section}",)))
        size, overlap = rng.choice([(30, 5), (64, 16), (200, 40), (16, 8)])
        chunks = Chunker(size, overlap).split(blocks)
        assert all(count_tokens(chunk.text) <= size for chunk in chunks)
        for block in blocks:
            in_section = " ".join(c.text for c in chunks if c.headings == block.headings)
            for token in re.findall(r"\w+", block.text):
                assert token in in_section


def test_helpers():
    assert token_windows("a b c d e", 2) == ["a b", "c d", "e"]
    assert last_tokens("one two, three", 2) == ", three"
    assert last_tokens("one two three", 2) == "two three"


@pytest.mark.parametrize("size,overlap", [(1, 0), (10, 6), (10, -1)])
def test_invalid_sizes(size, overlap):
    with pytest.raises(ValueError):
        Chunker(size, overlap)
