"""LanceDB table layout of the retrieval service and SQL filters built from user input.

Three tables in one LanceDB directory (shared by all tenants; every read is prefiltered
by `scope`, the tenant and collection):

- rag_chunks: one row per chunk, with its embedding and the text BM25 indexes
- rag_documents: one row per document id ever ingested; `deleted` rows are tombstones that
  keep the version counter, so a re-added document never reuses an old version number
- rag_collections: one row per collection

Every value from a caller goes into SQL through `sql_string` (quotes doubled; LanceDB's
parser treats backslashes literally, tested with hostile ids in tests/unit/test_rag_store.py).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

CHUNKS = "rag_chunks"
DOCUMENTS = "rag_documents"
COLLECTIONS = "rag_collections"
FTS_COLUMN = "search_text"
VECTOR_COLUMN = "vector"
DOCUMENT_ID_FILTER = "document_id"
_SEP = "\x1f"  # unit separator: cannot occur in validated tenant or collection names

RESULT_COLUMNS = ["uid", "collection", "doc_id", "version", "chunk_index", "chunk_id",
                  "title", "heading", "text", "page", "metadata"]


def chunks_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("uid", pa.string()),          # scope + doc id + version + index: unique
        ("scope", pa.string()),        # tenant + collection: the prefilter of every read
        ("tenant", pa.string()),
        ("collection", pa.string()),
        ("doc_id", pa.string()),
        ("version", pa.int64()),
        ("chunk_index", pa.int32()),
        ("chunk_id", pa.string()),     # "<doc id>@<version>#<index>", shown to clients
        ("title", pa.string()),
        ("heading", pa.string()),
        ("text", pa.string()),
        (FTS_COLUMN, pa.string()),     # title + heading + text: what BM25 and the embedder see
        ("page", pa.int32()),
        ("metadata", pa.string()),     # JSON object of the document
        ("meta_kv", pa.list_(pa.string())),  # 'key=<json value>' for equality filters
        ("created_at", pa.int64()),
        (VECTOR_COLUMN, pa.list_(pa.float32(), dim)),
    ])


DOCUMENTS_SCHEMA = pa.schema([
    ("doc_key", pa.string()),
    ("scope", pa.string()),
    ("tenant", pa.string()),
    ("collection", pa.string()),
    ("doc_id", pa.string()),
    ("version", pa.int64()),
    ("title", pa.string()),
    ("content_type", pa.string()),
    ("metadata", pa.string()),
    ("chunks", pa.int64()),
    ("bytes", pa.int64()),
    ("pages", pa.int32()),
    ("sha256", pa.string()),
    ("deleted", pa.bool_()),
    ("created_at", pa.int64()),
    ("updated_at", pa.int64()),
])

COLLECTIONS_SCHEMA = pa.schema([
    ("scope", pa.string()),
    ("tenant", pa.string()),
    ("collection", pa.string()),
    ("created_at", pa.int64()),
])


def scope_of(tenant: str, collection: str) -> str:
    return f"{tenant}{_SEP}{collection}"


def doc_key(scope: str, doc_id: str) -> str:
    return f"{scope}{_SEP}{doc_id}"


def chunk_uid(scope: str, doc_id: str, version: int, index: int) -> str:
    return f"{scope}{_SEP}{doc_id}{_SEP}{version}{_SEP}{index}"


def chunk_id(doc_id: str, version: int, index: int) -> str:
    return f"{doc_id}@{version}#{index}"


# ---------------------------------------------------------------------------- SQL
def sql_string(value: str) -> str:
    """A SQL string literal holding exactly `value`."""
    if "\x00" in value:
        raise ValueError("NUL characters cannot be filtered on")
    return "'" + value.replace("'", "''") + "'"


def sql_in(column: str, values: Iterable[str]) -> str:
    items = ", ".join(sql_string(value) for value in values)
    return f"{column} IN ({items})" if items else "false"


def scope_filter(scope: str) -> str:
    return f"scope = {sql_string(scope)}"


def metadata_terms(metadata: Mapping[str, Any]) -> list[str]:
    """Filterable 'key=<json>' terms of a document's metadata (scalars and their lists)."""
    terms: list[str] = []
    for key, value in metadata.items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            if _filterable(item):
                terms.append(metadata_term(key, item))
    return sorted(set(terms))


def metadata_term(key: str, value: str | int | float | bool) -> str:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)  # 2.0 and 2 are the same filter value
    return f"{key}={json.dumps(value, ensure_ascii=False, sort_keys=True)}"


def _filterable(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (str, int, bool))


def filters_sql(filters: Mapping[str, Any] | None) -> list[str]:
    """Equality filters (ANDed; a list means any of its values) -> SQL clauses."""
    clauses = []
    for key, value in (filters or {}).items():
        values = value if isinstance(value, list) else [value]
        if key == DOCUMENT_ID_FILTER:
            clauses.append(sql_in("doc_id", [str(item) for item in values]))
        else:
            terms = ", ".join(sql_string(metadata_term(key, item)) for item in values)
            clauses.append(f"array_has_any(meta_kv, [{terms}])")
    return clauses


def where(*clauses: str) -> str:
    return " AND ".join(f"({clause})" for clause in clauses if clause)
