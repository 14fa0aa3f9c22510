"""Wire models of the retrieval API (pydantic, no logic): what clients send to ingest,
retrieve, and to turn RAG on in a chat request. The Retriever validates plain dicts with
them too, so both sides agree on field names and limits."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.rag.config import COLLECTION_PATTERN, SearchMode

Scalar = str | int | float | bool
FilterValue = Scalar | list[Scalar]

_MAX_ID_CHARS = 256


def _no_control_chars(value: str, what: str) -> str:
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError(f"{what} must not contain control characters")
    return value


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DocumentIn(_Wire):
    """One document to add, or to replace when a document with this id exists."""

    id: str = Field(min_length=1, max_length=_MAX_ID_CHARS, description="Caller's id.")
    title: str | None = Field(None, max_length=1_000)
    content: str | None = Field(None, description="Text or markdown.")
    content_b64: str | None = Field(None, description="Base64 bytes (PDF, or encoded text).")
    content_type: str | None = Field(
        None, description="text/plain, text/markdown or application/pdf; empty: text/plain "
        "for `content`, sniffed (PDF or UTF-8 text) for `content_b64`.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="JSON object; "
                                     "scalar values (and lists of them) are filterable.")

    @field_validator("id")
    @classmethod
    def _id_printable(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("id must not be blank")
        return _no_control_chars(value, "id")

    @field_validator("metadata")
    @classmethod
    def _metadata_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            _check_filter_key(key)
        return value

    @model_validator(mode="after")
    def _one_content(self) -> "DocumentIn":
        if (self.content is None) == (self.content_b64 is None):
            raise ValueError("give exactly one of `content` (text) or `content_b64` (bytes)")
        return self


class IngestRequest(_Wire):
    collection: str
    documents: list[DocumentIn] = Field(min_length=1)

    @field_validator("collection")
    @classmethod
    def _collection(cls, value: str) -> str:
        return check_collection_name(value)


class SearchOptions(_Wire):
    """Shared by POST /v1/retrieve and the `rag` field of a chat request."""

    collection: str
    top_k: int | None = Field(None, ge=1)
    mode: SearchMode | None = None
    filters: dict[str, FilterValue] | None = Field(
        None, description="Equality filters, ANDed: metadata key -> value or list of "
        "values (any of them). `document_id` filters by document id.")

    @field_validator("collection")
    @classmethod
    def _collection(cls, value: str) -> str:
        return check_collection_name(value)

    @field_validator("filters")
    @classmethod
    def _filters(cls, value: dict[str, FilterValue] | None) -> dict[str, FilterValue] | None:
        for key, item in (value or {}).items():
            _check_filter_key(key)
            if isinstance(item, list) and not item:
                raise ValueError(f"filters.{key} must list at least one value")
        return value


class RetrieveRequest(SearchOptions):
    query: str = Field(min_length=1)


class RagOptions(SearchOptions):
    """`rag: {"collection": ..., "top_k": ...}` in a chat completion body (extra_body)."""


def check_collection_name(value: str) -> str:
    if not COLLECTION_PATTERN.match(value):
        raise ValueError("collection names are 1-64 characters: letters, digits, '.', '_' "
                         "and '-', starting with a letter or digit")
    return value


def _check_filter_key(key: str) -> None:
    if not key or len(key) > 64 or "=" in key:
        raise ValueError(f"metadata key {key!r} must be 1-64 characters without '='")
    _no_control_chars(key, "metadata keys")
