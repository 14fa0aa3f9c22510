"""Grounded prompts, sources, headers, RAG options, source ids and rank fusion (pure)."""
from __future__ import annotations

import copy

import pytest

from serve_app.errors import ApiError
from serve_app.rag.config import RagModelAlias, RagSettings
from serve_app.rag.fusion import reciprocal_rank_fusion
from serve_app.rag.prompting import (
    CITATION_INSTRUCTION,
    apply_rag,
    resolve_rag_options,
    snippet,
    sources_header,
)
from serve_app.rag.source_ids import document_prefix, parse_source_id, source_id


def chunk(doc: str, version: int, index: int, text: str, score: float = 0.5, **extra):
    return {"document_id": doc, "version": version, "chunk_id": f"{doc}@{version}#{index}",
            "chunk_index": index, "title": extra.pop("title", doc.title()),
            "heading": extra.pop("heading", ""), "text": text, "score": score,
            "page": extra.pop("page", None),
            "source_id": source_id("acme", "docs", doc, version), **extra}


CHUNKS = [chunk("wings", 2, 0, "Wings make lift.", 0.9, heading="Aero > Lift"),
          chunk("heat", 1, 3, "Slabs conduct heat.", 0.4, page=7),
          chunk("wings", 2, 1, "Stall happens past the critical angle.", 0.3)]
MESSAGES = [{"role": "user", "content": "Why do wings lift?"}]


# ---------------------------------------------------------------------------- messages
def test_sources_go_into_a_new_system_message_with_numbers_and_instruction():
    original = copy.deepcopy(MESSAGES)
    context = apply_rag(MESSAGES, CHUNKS)
    assert MESSAGES == original  # input untouched
    system, user = context.messages
    assert system["role"] == "system" and user == MESSAGES[0]
    content = system["content"]
    assert content.startswith(CITATION_INSTRUCTION)
    assert "[1] Wings - Aero > Lift\nWings make lift." in content
    assert "[2] Heat (page 7)\nSlabs conduct heat." in content
    assert "[3] Wings\nStall happens past the critical angle." in content
    assert content.index("[1]") < content.index("[2]") < content.index("[3]")


def test_existing_system_message_is_extended():
    messages = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    context = apply_rag(messages, CHUNKS[:1])
    assert len(context.messages) == 2
    assert context.messages[0]["content"].startswith("Be brief.\n\n" + CITATION_INSTRUCTION)


def test_list_content_gets_a_text_part():
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, *MESSAGES]
    parts = apply_rag(messages, CHUNKS[:1]).messages[0]["content"]
    assert parts[0] == {"type": "text", "text": "Be brief."}
    assert parts[1]["type"] == "text" and "[1] Wings" in parts[1]["text"]


def test_user_placement_prefixes_the_last_user_message():
    messages = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "Why do wings lift?"}]
    out = apply_rag(messages, CHUNKS[:1], placement="user").messages
    assert out[0] == messages[0] and out[1] == messages[1]
    assert out[2]["content"].startswith(CITATION_INSTRUCTION)
    assert out[2]["content"].endswith("Question: Why do wings lift?")


def test_no_chunks_leaves_messages_alone():
    context = apply_rag(MESSAGES, [])
    assert context.messages == MESSAGES and context.sources == [] and context.header == ""


def test_context_budget_keeps_whole_chunks_best_first():
    settings = RagSettings(max_context_chars=200)
    chunks = [chunk("a", 1, 0, "x" * 120), chunk("b", 1, 0, "y" * 120), chunk("c", 1, 0, "z")]
    context = apply_rag(MESSAGES, chunks, settings)
    assert [s["document_id"] for s in context.sources] == ["a"]
    huge = apply_rag(MESSAGES, [chunk("big", 1, 0, "w" * 1000)], settings)
    assert huge.sources[0]["snippet"].startswith("w")
    assert "w" * 200 in huge.messages[0]["content"]
    assert "w" * 201 not in huge.messages[0]["content"]


# ---------------------------------------------------------------------------- sources
def test_sources_list_fields():
    context = apply_rag(MESSAGES, CHUNKS)
    assert context.sources[1] == {
        "index": 2, "document_id": "heat", "version": 1, "chunk_id": "heat@1#3", "score": 0.4,
        "title": "Heat", "heading": None, "page": 7, "snippet": "Slabs conduct heat.",
        "source_id": "doc:acme/docs/heat@1"}
    assert context.source_ids == ["doc:acme/docs/wings@2", "doc:acme/docs/heat@1"]
    assert context.chunk_refs == ["doc:acme/docs/wings@2#0", "doc:acme/docs/heat@1#3",
                                  "doc:acme/docs/wings@2#1"]


def test_snippet_cuts_at_a_word():
    text = "alpha beta gamma delta epsilon zeta eta theta"
    assert snippet(text, 100) == text
    cut = snippet(text, 20)
    assert len(cut) <= 20 and cut.endswith("\u2026") and cut == "alpha beta gamma\u2026"
    assert snippet("a\n\n  b", 10) == "a b"


def test_header_is_ascii_with_encoded_ids_and_truncates():
    context = apply_rag(MESSAGES, CHUNKS)
    assert context.header == "1=wings@2#0;score=0.9,2=heat@1#3;score=0.4,3=wings@2#1;score=0.3"
    odd = apply_rag(MESSAGES, [chunk("a,b;c=d/é@x", 3, 0, "text")])
    assert odd.header == "1=a%2Cb%3Bc%3Dd%2F%C3%A9%40x@3#0;score=0.5"
    odd.header.encode("ascii")
    sources = [{"index": i, "document_id": f"doc{i}", "version": 1, "chunk_id": f"doc{i}@1#0",
                "score": 0.1} for i in range(1, 101)]
    header = sources_header(sources, max_bytes=120)
    assert len(header) <= 120
    kept = header.split(",")[:-1]
    assert header.split(",")[-1] == f"+{100 - len(kept)}"
    assert sources_header(sources, max_bytes=5) == "+100"


# ---------------------------------------------------------------------------- options
def test_resolve_rag_options():
    settings = RagSettings(model_aliases={"wiki-gpt": RagModelAlias(
        model="auto", collection="wiki", top_k=3)})
    assert resolve_rag_options("m", None, settings) == ("m", None)
    model, options = resolve_rag_options("m", {"collection": "docs", "top_k": 2}, settings)
    assert model == "m" and (options.collection, options.top_k) == ("docs", 2)
    model, options = resolve_rag_options("wiki-gpt", None, settings)
    assert model == "auto" and (options.collection, options.top_k) == ("wiki", 3)
    model, options = resolve_rag_options("wiki-gpt", {"top_k": 1}, settings)
    assert (options.collection, options.top_k) == ("wiki", 1)


@pytest.mark.parametrize("rag,param", [
    ({"top_k": 2}, "rag.collection"),
    ({"collection": "a/b"}, "rag.collection"),
    ({"collection": "docs", "top_k": 0}, "rag.top_k"),
    ({"collection": "docs", "top_k": 21}, "rag.top_k"),
    ({"collection": "docs", "mode": "magic"}, "rag.mode"),
    ({"collection": "docs", "unknown": 1}, "rag.unknown"),
    ("docs", "rag"),
])
def test_invalid_rag_options_are_422(rag, param):
    with pytest.raises(ApiError) as info:
        resolve_rag_options("m", rag, RagSettings())
    assert (info.value.status, info.value.param) == (422, param)


def test_settings_validation():
    with pytest.raises(ValueError):
        RagSettings(chunk_tokens=100, chunk_overlap_tokens=60)
    with pytest.raises(ValueError):
        RagSettings(allowed_content_types=["text/html"])
    with pytest.raises(ValueError):
        RagSettings(model_aliases={"x": {"model": "m", "collection": "bad/name"}})
    with pytest.raises(ValueError):
        RagSettings(default_top_k=10, max_top_k=5)
    with pytest.raises(ValueError):
        RagSettings(model_aliases={"x": {"model": "m", "collection": "c", "top_k": 30}})


# ---------------------------------------------------------------------------- source ids
def test_source_id_round_trip_with_odd_document_ids():
    sid = source_id("acme", "docs", "dir/file@2.md", 7)
    assert sid == "doc:acme/docs/dir/file@2.md@7"
    assert parse_source_id(sid) == ("acme", "docs", "dir/file@2.md", 7)
    assert sid.startswith(document_prefix("acme", "docs", "dir/file@2.md") + "@")
    for bad in ["acme/docs/x@1", "doc:acme/docs@1", "doc:acme/docs/x@v1", "doc:acme/docs/x"]:
        with pytest.raises(ValueError):
            parse_source_id(bad)


# ---------------------------------------------------------------------------- fusion
def test_reciprocal_rank_fusion():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a", "d"]], k=60)
    assert [item.key for item in fused] == ["a", "c", "b", "d"]
    assert fused[0].score == pytest.approx(1 / 61 + 1 / 62)
    assert fused[0].ranks == (1, 2) and fused[3].ranks == (None, 3)


def test_fusion_ties_and_weights():
    # b and x tie on score; b has the better best rank
    fused = reciprocal_rank_fusion([["a", "b"], ["x", "y"]], k=10)
    assert [item.key for item in fused] == ["a", "x", "b", "y"]
    weighted = reciprocal_rank_fusion([["a"], ["b"]], k=10, weights=[1.0, 2.0])
    assert [item.key for item in weighted] == ["b", "a"]
    assert reciprocal_rank_fusion([["a", "a"]], k=1)[0].score == pytest.approx(0.5)
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([["a"]], k=0)
