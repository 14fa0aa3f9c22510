"""Parsing uploads into text blocks with heading paths; bad uploads become clear 4xx."""
from __future__ import annotations

import base64

import pytest

from serve_app.errors import ApiError
from serve_app.rag.config import RagSettings
from serve_app.rag.models import DocumentIn
from serve_app.rag.parsing import (
    load_document,
    normalise_content_type,
    parse_markdown,
    parse_pdf,
    parse_plain_text,
)
from tests.support.pdf import make_pdf

SETTINGS = RagSettings()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def api_error(call, *args, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as info:
        call(*args, **kwargs)
    return info.value


# ---------------------------------------------------------------------------- text + markdown
def test_plain_text_splits_paragraphs_on_blank_lines():
    parsed = parse_plain_text("First line\r\nstill first.\r\n\r\n  \n\nSecond\x00 para.\n")
    assert [block.text for block in parsed.blocks] == ["First line\nstill first.", "Second para."]
    assert all(block.headings == () for block in parsed.blocks)


def test_markdown_heading_paths_follow_levels():
    text = ("# Guide\nIntro text.\n\n## Install\nRun it.\n\n### Linux\nUse apt.\n\n"
            "## Use\nCall it.\n\n# Appendix\nMore.")
    parsed = parse_markdown(text)
    assert [(block.headings, block.text) for block in parsed.blocks] == [
        (("Guide",), "Intro text."),
        (("Guide", "Install"), "Run it."),
        (("Guide", "Install", "Linux"), "Use apt."),
        (("Guide", "Use"), "Call it."),
        (("Appendix",), "More."),
    ]
    assert parsed.title == "Guide"


def test_markdown_heading_closing_hashes_and_hashtags():
    parsed = parse_markdown("# Using C# ##\nbody\n\n#hashtag is text\n\n## Next ##\nmore")
    assert [(block.headings, block.text) for block in parsed.blocks] == [
        (("Using C#",), "body"), (("Using C#",), "#hashtag is text"),
        (("Using C#", "Next"), "more")]


def test_markdown_fenced_code_is_not_a_heading_and_keeps_lines():
    text = "# Real\n```bash\n# not a heading\necho hi\n```\nAfter."
    parsed = parse_markdown(text)
    assert [(block.headings, block.text) for block in parsed.blocks] == [
        (("Real",), "# not a heading\necho hi"), (("Real",), "After.")]


def test_markdown_setext_front_matter_links_and_rules():
    text = ("---\ntitle: 'From front matter'\nauthor: x\n---\n"
            "Top\n===\nSee [the docs](http://x.example/a) and ![a chart](c.png).\n\n---\n\n"
            "Sub section\n-----------\n**Bold** words <!-- hidden -->here.")
    parsed = parse_markdown(text)
    assert parsed.title == "From front matter"
    assert [(block.headings, block.text) for block in parsed.blocks] == [
        (("Top",), "See the docs and a chart."),
        (("Top", "Sub section"), "Bold words here."),
    ]


def test_content_type_aliases_and_parameters():
    assert normalise_content_type("Text/Markdown; charset=utf-8") == "text/markdown"
    assert normalise_content_type("text/x-markdown") == "text/markdown"
    assert normalise_content_type("application/x-pdf") == "application/pdf"


# ---------------------------------------------------------------------------- PDF
def test_pdf_text_pages_outline_and_title():
    data = make_pdf([["Lift of wings in a slipstream."], ["Drag rises with speed."]],
                    outline=[("Intro", 0, None), ("Drag", 1, "Intro")], title="Wing notes")
    parsed = parse_pdf(data, max_pages=10)
    assert parsed.title == "Wing notes"
    assert parsed.pages == 2
    assert [(block.page, block.headings, block.text) for block in parsed.blocks] == [
        (1, ("Intro",), "Lift of wings in a slipstream."),
        (2, ("Intro", "Drag"), "Drag rises with speed."),
    ]


def test_pdf_upload_through_load_document():
    data = make_pdf([["Hello from a PDF."]])
    parsed = load_document(DocumentIn(id="p", content_b64=b64(data)), SETTINGS)  # sniffed
    assert parsed.content_type == "application/pdf"
    assert parsed.blocks[0].text == "Hello from a PDF."
    assert parsed.n_bytes == len(data)


@pytest.mark.parametrize("data", [b"%PDF-1.7\nthis is not really a pdf", b"%PDF-"])
def test_unreadable_pdf_is_400(data):
    error = api_error(load_document, DocumentIn(id="p", content_b64=b64(data),
                                                content_type="application/pdf"), SETTINGS)
    assert (error.status, error.code) == (400, "invalid_pdf")


def test_bytes_declared_pdf_without_header_is_400():
    error = api_error(load_document, DocumentIn(id="p", content_b64=b64(b"plain words"),
                                                content_type="application/pdf"), SETTINGS)
    assert (error.status, error.code) == (400, "invalid_pdf")


def test_encrypted_pdf_is_400():
    data = make_pdf([["secret"]], password="pw")
    error = api_error(load_document, DocumentIn(id="p", content_b64=b64(data)), SETTINGS)
    assert error.status == 400 and "encrypted" in error.message


def test_pdf_without_text_layer_is_empty_document():
    data = make_pdf([[], []])
    error = api_error(load_document, DocumentIn(id="scan", content_b64=b64(data)), SETTINGS)
    assert (error.status, error.code) == (400, "empty_document")
    assert "OCR" in error.message


def test_pdf_with_too_many_pages_is_413():
    data = make_pdf([["one"], ["two"], ["three"]])
    error = api_error(load_document, DocumentIn(id="p", content_b64=b64(data)),
                      RagSettings(max_pdf_pages=2))
    assert (error.status, error.code) == (413, "document_too_large")


def test_pdf_as_text_content_is_400():
    error = api_error(load_document, DocumentIn(id="p", content="%PDF-1.4",
                                                content_type="application/pdf"), SETTINGS)
    assert error.status == 400 and error.param == "document.content"


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("content", ["", "   \n\n\t  ", "# Only\n## Headings\n"])
def test_empty_documents_are_400(content):
    error = api_error(load_document, DocumentIn(id="e", content=content,
                                                content_type="text/markdown"), SETTINGS)
    assert (error.status, error.code) == (400, "empty_document")


def test_unsupported_type_is_415():
    error = api_error(load_document, DocumentIn(id="h", content="<p>x</p>",
                                                content_type="text/html"), SETTINGS)
    assert (error.status, error.code) == (415, "unsupported_media_type")
    assert "text/markdown" in error.message


def test_type_not_allowed_by_settings_is_415():
    settings = RagSettings(allowed_content_types=["text/plain"])
    error = api_error(load_document, DocumentIn(id="m", content="# x\ny",
                                                content_type="text/markdown"), settings)
    assert error.status == 415


def test_undetectable_binary_is_415():
    error = api_error(load_document, DocumentIn(id="b", content_b64=b64(b"\xff\xfe\x00\x81")),
                      SETTINGS)
    assert error.status == 415 and error.param == "document.content_type"


def test_non_utf8_text_is_400():
    error = api_error(load_document, DocumentIn(id="b", content_b64=b64(b"caf\xe9"),
                                                content_type="text/plain"), SETTINGS)
    assert (error.status, error.code) == (400, "invalid_content")


def test_invalid_base64_is_400():
    error = api_error(load_document, DocumentIn(id="b", content_b64="not base64!!"), SETTINGS)
    assert error.status == 400 and error.param == "document.content_b64"


def test_oversized_text_is_413():
    settings = RagSettings(max_document_bytes=100)
    error = api_error(load_document, DocumentIn(id="big", content="é" * 51), settings)
    assert (error.status, error.code) == (413, "document_too_large")
    assert load_document(DocumentIn(id="ok", content="é" * 50), settings).n_bytes == 100


def test_oversized_upload_is_refused_before_decoding():
    settings = RagSettings(max_document_bytes=1000)
    # Not valid base64 either: the size check must come first.
    error = api_error(load_document, DocumentIn(id="big", content_b64="!" * 5000), settings)
    assert error.status == 413


def test_document_needs_exactly_one_content_field():
    with pytest.raises(ValueError):
        DocumentIn(id="x")
    with pytest.raises(ValueError):
        DocumentIn(id="x", content="a", content_b64="YQ==")
