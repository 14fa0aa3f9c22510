"""Retrieval-augmented generation: documents in, grounded prompts out.

Public surface (the Retriever deployment and the gateway use only these):
- `RagSettings`, `RagModelAlias`                      settings (serve_app.rag.config)
- `DocumentIn`, `IngestRequest`, `RetrieveRequest`,
  `RagOptions`                                       wire models (serve_app.rag.models)
- `DocumentStore`, `embed_in_thread`                 tables, ingestion, search (store)
- `apply_rag`, `resolve_rag_options`, `RagContext`   prompts, sources, headers (prompting)
- `source_id`, `document_prefix`, `parse_source_id`  cache-coherence ids (source_ids)
"""
from serve_app.rag.config import RagModelAlias, RagSettings
from serve_app.rag.models import DocumentIn, IngestRequest, RagOptions, RetrieveRequest
from serve_app.rag.prompting import RagContext, apply_rag, resolve_rag_options
from serve_app.rag.source_ids import document_prefix, parse_source_id, source_id
from serve_app.rag.store import DocumentStore, embed_in_thread

__all__ = [
    "DocumentIn", "DocumentStore", "IngestRequest", "RagContext", "RagModelAlias",
    "RagOptions", "RagSettings", "RetrieveRequest", "apply_rag", "document_prefix",
    "embed_in_thread", "parse_source_id", "resolve_rag_options", "source_id",
]
