"""No pattern with backtracking runs over user, document or model text: the work of every
text function grows about linearly with hostile input, and uploads are parsed in worker
processes with a time limit.

Growth test: the best-of-3 CPU time at size 8n must stay under 32x the time at size n
(quadratic work would be 64x). The sizes make the old Python-`re` code clearly quadratic
(git HEAD, at 1_500 -> 12_000 characters: normalize_prompt("!" * n + "a") 0.02 -> 1.1 s;
at 40_000: 12 s).
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest

from serve_app import textmatch
from serve_app.cache import guard, policy
from serve_app.errors import ApiError
from serve_app.llm.tool_calls import ToolCallFormat
from serve_app.rag import chunking, parsing
from serve_app.rag.parsing import Block, ParserPool
from serve_app.routing import features

HOSTILE: dict[str, Callable[[int], str]] = {
    "bang_then_letter": lambda n: "!" * n + "a",
    "comment_openers": lambda n: "<!--" * (n // 4),
    "link_openers": lambda n: "[a" * (n // 2),
    "image_openers": lambda n: "![" * (n // 2),
    "stars": lambda n: "*" * n,
    "double_stars_lines": lambda n: ("**" + "a" * 50 + "\n") * (n // 53),
    "backticks": lambda n: "`" * n,
    "hashes": lambda n: "#" * n,
    "atx_spaces": lambda n: "# a" + " " * n + "b",
    "rule_spaces": lambda n: "- -" + " " * n + "x",
    "spaces": lambda n: " " * n + "x",
    "newlines": lambda n: "\n" * n,
    "space_newlines": lambda n: " \n" * (n // 2),
    "backslashes": lambda n: "\\" * n,
    "nested_brackets": lambda n: "[" * (n // 2) + "]" * (n // 2),
    "underscores": lambda n: "__a" * (n // 3),
    "dots_spaces": lambda n: ". " * (n // 2) + "x",
    "hyphen_breaks": lambda n: "a-\n" * (n // 3),
    "mixed_unicode": lambda n: "İé٣ \u3000中。" * (n // 7),
}


def _markdown(text: str) -> object:
    return parsing.parse_markdown(text)


def _chunks(text: str) -> object:
    return chunking.Chunker(64, 16).split([Block(text)])


def _tool_calls(text: str) -> object:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    from serve_app.protocol import ChatCompletionRequest

    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [tool]})
    fmt = ToolCallFormat.for_request(request)
    assert fmt is not None
    return fmt.parse_output('{"tool_calls": [' + text, "length")


FUNCTIONS: dict[str, Callable[[str], object]] = {
    "policy.normalize_prompt": policy.normalize_prompt,
    "policy.query_text": policy.query_text,
    "guard.analyze": guard.analyze.__wrapped__,  # not the memoised one
    "guard.check": lambda text: guard.PairGuard().check(text, text + " x"),
    "features.text_features": features.text_features,
    "parsing.parse_markdown": _markdown,
    "parsing.parse_plain_text": parsing.parse_plain_text,
    "parsing.pdf_paragraphs": parsing._pdf_paragraphs,
    "chunking.split": _chunks,
    "tool_calls.parse_output": _tool_calls,
}
N = 1_500


def _cpu(function: Callable[[str], object], text: str) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        function(text)
        best = min(best, time.process_time() - started)
    return best


@pytest.mark.parametrize("shape", sorted(HOSTILE))
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_work_grows_linearly_on_hostile_text(name: str, shape: str) -> None:
    function, make = FUNCTIONS[name], HOSTILE[shape]
    small, large = _cpu(function, make(N)), _cpu(function, make(8 * N))
    # The floor absorbs timer noise when both runs take microseconds.
    assert large < 32 * small + 0.02, f"{name} on {shape}: {small:.4f}s -> {large:.4f}s"


def test_textmatch_matches_what_python_re_matches() -> None:
    """The expanded classes and case folding mean what they mean in Python."""
    every = "".join(map(chr, range(0x110000)))
    for escape in ("w", "d", "s", "W"):
        assert textmatch.compile(f"\\{escape}").count(every) == len(re.findall(f"\\{escape}", every))
    for letter in "abcdefghijklmnopqrstuvwxyz":
        expected = set(re.findall(letter, every, re.IGNORECASE))
        found = {m.group() for m in textmatch.compile(letter, ignore_case=True).finditer(every)}
        assert found == expected, letter
    sample = "éhi hi_ İd fİnd all ,\u3000prove\u2028x; \x0b\nU.S. éU.S.A."
    for pattern, flags in ((r"\b(hi|find all|prove)\b", re.I), (r"\b(?:[A-Z]\.){2,}", 0),
                           (r";\s*$", re.M), (r"^\s*x", re.M)):
        ours = textmatch.compile(pattern, ignore_case=bool(flags & re.I),
                                 multiline=bool(flags & re.M))
        assert [m.span() for m in ours.finditer(sample)] == [
            m.span() for m in re.finditer(pattern, sample, flags)], pattern


def test_lone_surrogates_match_like_python() -> None:
    text = "a\ud800b `x\udfff` c"
    assert textmatch.compile(r"\w+").findall(text) == re.findall(r"\w+", text)
    assert guard._CODE_SPAN.findall(text) == ["x\udfff"]


# ---------------------------------------------------------------------------- upload parsing
def _sleep_then_parse(data: bytes | str, content_type: str, settings: object,
                      param: str) -> object:
    """Stands in for a pathological document: "slow" never finishes in time."""
    if data == "slow":
        time.sleep(60)
    return parsing.parse_job(data, content_type, settings, param)  # type: ignore[arg-type]


def test_parse_past_the_time_limit_is_422_and_the_pool_recovers() -> None:
    pool = ParserPool(1, timeout_s=5.0, job=_sleep_then_parse)
    try:
        assert pool.parse("# Title\n\ntext", "text/markdown").blocks[0].text == "text"
        started = time.monotonic()
        with pytest.raises(ApiError) as error:
            pool.parse("slow", "text/plain", param="documents[0]")
        assert error.value.status == 422 and error.value.code == "parse_timeout"
        assert error.value.param == "documents[0]" and "parsed within" in error.value.message
        assert time.monotonic() - started < 30  # the stuck worker was not waited for
        # The only worker was killed and replaced: the next document still parses.
        assert pool.parse("next one", "text/plain").blocks[0].text == "next one"
        with pytest.raises(ApiError) as invalid:  # errors of the parser itself still travel
            pool.parse(b"not a pdf", "application/pdf")
        assert invalid.value.status == 400 and invalid.value.code == "invalid_pdf"
    finally:
        pool.close()


def test_load_document_uses_the_installed_pool() -> None:
    from serve_app.rag.config import RagSettings
    from serve_app.rag.models import DocumentIn

    pool = ParserPool(1, timeout_s=30.0)
    parsing.parse_in_processes(pool)
    try:
        doc = DocumentIn.model_validate({"id": "d", "content": "<!--" * 20_000 + "\n\nbody",
                                         "content_type": "text/markdown"})
        parsed = parsing.load_document(doc, RagSettings())
        assert [block.text for block in parsed.blocks] == ["<!--" * 20_000, "body"]
    finally:
        parsing.parse_in_processes(None)
        pool.close()
