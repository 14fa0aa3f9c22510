"""Settings of the retrieval (RAG) service: limits, chunking, search, index upkeep, prompting.

The lead composes `RagSettings` into the stack's settings schema as the `rag` section.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SUPPORTED_CONTENT_TYPES = ("text/plain", "text/markdown", "application/pdf")
SearchMode = Literal["hybrid", "dense", "bm25"]

# Tenant and collection names end up in source ids ("doc:<tenant>/<collection>/<doc>@<v>"),
# so neither may contain "/" (nor control characters).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # tenant ids (admin_protocol)
COLLECTION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RagModelAlias(_Strict):
    """A model id clients may send that means "this model, grounded in this collection"."""

    model: str = Field(min_length=1, description="Model the request is really sent to "
                       "(a served model id, or 'auto' for the router).")
    collection: str = Field(description="Collection (of the caller's tenant) to retrieve from.")
    top_k: int | None = Field(None, ge=1, description="Chunks put into the prompt; "
                              "empty: RagSettings.default_top_k.")

    @field_validator("collection")
    @classmethod
    def _collection_name(cls, value: str) -> str:
        if not COLLECTION_PATTERN.match(value):
            raise ValueError(f"collection {value!r} must match {COLLECTION_PATTERN.pattern}")
        return value


class RagSettings(_Strict):
    # ------------------------------------------------------------------ storage
    uri: str | None = Field(
        None, description="LanceDB directory or object-store URI (s3://...). Empty: "
        "<data_dir>/rag.")
    embedding_dim: int = Field(384, ge=1, description="Dimension of the Embedder's vectors.")
    read_consistency_s: float | None = Field(
        1.0, ge=0, description="How stale a replica's view of the tables may get (seconds; "
        "0 = check every read, empty = never re-check; use 1 replica or a small value).")

    # ------------------------------------------------------------------ input limits
    max_document_bytes: int = Field(10_000_000, ge=1, description="Larger documents get 413.")
    max_documents_per_request: int = Field(64, ge=1, description="More documents per "
                                           "ingest call get 413.")
    max_chunks_per_document: int = Field(5_000, ge=1, description="Larger documents get 413.")
    max_pdf_pages: int = Field(1_000, ge=1, description="Longer PDFs get 413.")
    max_metadata_bytes: int = Field(4_096, ge=2, description="JSON size of a document's "
                                    "metadata; larger gets 400.")
    parse_timeout_s: float = Field(
        20.0, gt=0, description="Time limit of parsing one uploaded document (in a worker "
        "process); a document that takes longer gets 422 and its worker is replaced.")
    parse_workers: int = Field(2, ge=1, description="Worker processes that parse uploads "
                               "in the Retriever, outside its event loop and GIL.")
    allowed_content_types: list[str] = Field(
        list(SUPPORTED_CONTENT_TYPES),
        description="Accepted content types (a subset of text/plain, text/markdown, "
        "application/pdf); others get 415.")

    # ------------------------------------------------------------------ chunking
    chunk_tokens: int = Field(
        200, ge=16, description="Chunk size in estimated tokens (words, punctuation and CJK "
        "characters); 200 fits all-MiniLM-L6-v2's 256-wordpiece window with the title.")
    chunk_overlap_tokens: int = Field(40, ge=0, description="Tokens repeated from the end "
                                      "of a chunk at the start of the next in one section.")

    # ------------------------------------------------------------------ search
    default_top_k: int = Field(5, ge=1, description="Chunks returned when a request sets none.")
    max_top_k: int = Field(100, ge=1, description="Most chunks one search may ask for.")
    max_chat_top_k: int = Field(20, ge=1, description="Most chunks a chat request may put "
                                "into its prompt (rag.top_k or an alias's top_k).")
    max_query_chars: int = Field(4_000, ge=1, description="Longer queries get 400.")
    default_mode: SearchMode = Field("hybrid", description="hybrid (dense + BM25 fused by "
                                     "reciprocal rank), dense or bm25.")
    dense_candidates: int = Field(50, ge=1, description="Dense hits fed into fusion "
                                  "(at least top_k).")
    bm25_candidates: int = Field(50, ge=1, description="BM25 hits fed into fusion "
                                 "(at least top_k).")
    rrf_k: float = Field(60.0, gt=0, description="Reciprocal rank fusion constant: "
                         "score = sum 1 / (rrf_k + rank).")

    # ------------------------------------------------------------------ index upkeep
    exact_search_max_rows: int = Field(
        10_000, ge=0, description="Collections up to this many chunks are searched exactly "
        "(flat, prefiltered) even when an ANN index exists; ANN misses rows of small "
        "collections in a shared table.")
    vector_index_min_rows: int = Field(20_000, ge=1, description="Build the ANN index once "
                                       "the chunk table holds this many rows.")
    vector_index_type: Literal["IVF_FLAT", "IVF_HNSW_SQ"] = Field(
        "IVF_FLAT", description="IVF_FLAT trains in seconds; IVF_HNSW_SQ searches faster "
        "but takes minutes to build on small CPUs.")
    vector_partition_rows: int = Field(1_000, ge=16, description="Rows per IVF partition "
                                       "when the index is (re)built.")
    vector_nprobes: int = Field(
        40, ge=1, description="IVF partitions searched per query (100k chunks, 100 "
        "partitions: recall@10 vs exact 0.93 at 20, 0.998 at 40; benchmarks/rag_cranfield).")
    hnsw_ef: int = Field(100, ge=1, description="HNSW candidate list size per query.")
    vector_retrain_growth: float = Field(2.0, gt=1, description="Retrain the ANN index "
                                         "when the table grew this many times since.")
    compact_min_fragments: int = Field(8, ge=2, description="Compact when a table has this "
                                       "many small fragments (one per write).")
    index_update_min_rows: int = Field(2_000, ge=1, description="Fold unindexed rows into "
                                       "the indexes once this many accumulate.")
    maintenance_interval_s: float = Field(30.0, gt=0, description="Period of the background "
                                          "compaction/indexing task.")
    cleanup_older_than_s: float = Field(3_600.0, ge=0, description="Table versions older "
                                        "than this are deleted by compaction.")

    # ------------------------------------------------------------------ ingestion
    embed_batch_size: int = Field(64, ge=1, description="Texts per Embedder call.")
    embed_timeout_s: float = Field(60.0, gt=0, description="Timeout of one Embedder call.")

    # ------------------------------------------------------------------ prompting
    snippet_chars: int = Field(200, ge=20, description="Length of `sources[].snippet`.")
    max_context_chars: int = Field(6_000, ge=200, description="Most characters of retrieved "
                                   "text put into a prompt (whole chunks, best first).")
    context_placement: Literal["system", "user"] = Field(
        "system", description="Put the sources into the (first) system message or in front "
        "of the last user message.")
    max_sources_header_bytes: int = Field(2_048, ge=64, description="Cap of x-rag-sources.")
    model_aliases: dict[str, RagModelAlias] = Field(
        default_factory=dict, description="Model ids that turn RAG on: alias -> "
        "{model, collection, top_k}.")

    @field_validator("allowed_content_types")
    @classmethod
    def _known_types(cls, value: list[str]) -> list[str]:
        normalised = [item.strip().lower() for item in value]
        unknown = sorted(set(normalised) - set(SUPPORTED_CONTENT_TYPES))
        if unknown:
            raise ValueError(f"unsupported content types {unknown}; choose from "
                             f"{list(SUPPORTED_CONTENT_TYPES)}")
        if not normalised:
            raise ValueError("allowed_content_types must name at least one type")
        return normalised

    @model_validator(mode="after")
    def _consistent(self) -> "RagSettings":
        if self.chunk_overlap_tokens * 2 > self.chunk_tokens:
            raise ValueError("chunk_overlap_tokens must be at most half of chunk_tokens")
        if self.default_top_k > min(self.max_top_k, self.max_chat_top_k):
            raise ValueError("default_top_k must not exceed max_top_k nor max_chat_top_k")
        for alias, target in self.model_aliases.items():
            if target.top_k is not None and target.top_k > self.max_chat_top_k:
                raise ValueError(f"model_aliases[{alias!r}].top_k exceeds max_chat_top_k")
            if target.model == alias:
                raise ValueError(f"model_aliases[{alias!r}].model must name another model")
        return self
