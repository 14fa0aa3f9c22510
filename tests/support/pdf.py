"""Builds small text PDFs for the RAG tests (pypdf objects, Helvetica text operators)."""
from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO

from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject


def make_pdf(pages: Sequence[Sequence[str]], outline: Sequence[tuple[str, int, str | None]] = (),
             title: str | None = None, password: str | None = None) -> bytes:
    """pages: lines of text per page; outline: (title, 0-based page, parent title or None)."""
    writer = PdfWriter()
    font = writer._add_object(DictionaryObject({
        NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
        NameObject("/BaseFont"): NameObject("/Helvetica")}))
    for lines in pages:
        page = writer.add_blank_page(612, 792)
        escaped = [line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
                   for line in lines]
        ops = ["BT /F1 12 Tf 72 720 Td 16 TL", *[f"({line}) Tj T*" for line in escaped], "ET"]
        stream = DecodedStreamObject()
        stream.set_data(" ".join(ops).encode("latin-1"))
        page[NameObject("/Contents")] = writer._add_object(stream)
        page[NameObject("/Resources")] = DictionaryObject({
            NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
    items: dict[str, object] = {}
    for heading, page_number, parent in outline:
        items[heading] = writer.add_outline_item(title=heading, page_number=page_number,
                                                 parent=items.get(parent) if parent else None)
    if title:
        writer.add_metadata({"/Title": title})
    if password:
        writer.encrypt(password, algorithm="RC4-128")
    buffer = BytesIO()
    writer.write(buffer)
    return buffer.getvalue()
