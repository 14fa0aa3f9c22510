"""Source ids: how cached answers and ledger rows name the documents they were built from.

    doc:<tenant>/<collection>/<document id>@<version>

Tenant and collection names contain no "/" (see config.NAME_PATTERN and
COLLECTION_PATTERN); the document id may contain anything printable, including "/" and "@",
so parse from the left for tenant and collection and from the right for the version.
`document_prefix` (everything before "@") matches every version of one document.
"""
from __future__ import annotations

from typing import NamedTuple

PREFIX = "doc:"


class SourceRef(NamedTuple):
    tenant: str
    collection: str
    document_id: str
    version: int


def source_id(tenant: str, collection: str, document_id: str, version: int) -> str:
    return f"{document_prefix(tenant, collection, document_id)}@{int(version)}"


def document_prefix(tenant: str, collection: str, document_id: str) -> str:
    return f"{PREFIX}{tenant}/{collection}/{document_id}"


def parse_source_id(value: str) -> SourceRef:
    if not value.startswith(PREFIX):
        raise ValueError(f"not a source id: {value!r}")
    head, sep, version = value[len(PREFIX):].rpartition("@")
    parts = head.split("/", 2)
    if not sep or len(parts) != 3 or not all(parts) or not version.isdigit():
        raise ValueError(f"not a source id: {value!r}")
    return SourceRef(parts[0], parts[1], parts[2], int(version))
