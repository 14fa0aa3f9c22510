"""Retriever: document ingestion and hybrid search over LanceDB. A thin shell over
serve_app.rag.store.DocumentStore, which owns the tables; this class adds the Embedder
handle, the error boundary, the background compaction/indexing task and the worker processes
that parse uploads (a document gets `rag.parse_timeout_s`; no upload blocks this replica).

Run one replica: writes are serialised inside a replica (versions are assigned under a
lock); more replicas would race on versions of the same document.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from serve_app.errors import error_boundary
from deployments.handles import LazyHandle
from serve_app.rag import parsing
from serve_app.rag.store import DocumentStore
from serve_app.settings import StackAppSettings

log = logging.getLogger("ray.serve")


@serve.deployment(name="Retriever", max_ongoing_requests=64, num_replicas=1,
                  health_check_period_s=10)
@error_boundary("retriever", code="retriever_error", status=500)
class Retriever:
    async def __init__(self, settings: dict[str, Any], embedder: Any | None = None) -> None:
        stack = StackAppSettings.model_validate(settings)
        self.settings = stack.rag
        uri = self.settings.uri or str(stack.data_dir / "rag")
        self.embedder = embedder or LazyHandle("Embedder", stack.models_app)
        # DocumentStore parses in a thread; the pool moves that work into processes.
        self.parser = parsing.ParserPool(self.settings.parse_workers,
                                         self.settings.parse_timeout_s)
        parsing.parse_in_processes(self.parser)
        self.store = await DocumentStore.open(uri, self.settings, self._embed)
        self._maintenance: asyncio.Task[None] | None = None
        self._start_maintenance()

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        return await self.embedder.call("embed", texts, timeout_s=self.settings.embed_timeout_s)

    # ------------------------------------------------------------------ API (dicts in/out)
    async def ingest(self, tenant: str, collection: str,
                     documents: list[dict[str, Any]]) -> list[dict[str, Any]] | dict[str, Any]:
        """-> per document {id, version, chunks, replaced, source_id, stale_source_ids,
        warnings}; an error payload when any document is rejected (nothing is written)."""
        return await self.store.ingest(tenant, collection, documents)

    async def delete_document(self, tenant: str, collection: str, doc_id: str) -> dict[str, Any]:
        """-> {deleted, id, version, source_ids}."""
        return await self.store.delete_document(tenant, collection, doc_id)

    async def delete_collection(self, tenant: str, collection: str) -> dict[str, Any]:
        """-> {deleted, collection, documents, source_ids}."""
        return await self.store.delete_collection(tenant, collection)

    async def search(self, tenant: str, collection: str, query: str, top_k: int | None = None,
                     mode: str | None = None, filters: dict[str, Any] | None = None,
                     query_vector: list[float] | None = None,
                     ) -> list[dict[str, Any]] | dict[str, Any]:
        """-> chunks, best first (see DocumentStore.search). Pass `query_vector` when the
        query is already embedded (saves an Embedder call)."""
        return await self.store.search(tenant, collection, query, top_k, mode, filters,
                                       query_vector)

    async def list_collections(self, tenant: str) -> list[dict[str, Any]] | dict[str, Any]:
        return await self.store.list_collections(tenant)

    async def list_documents(self, tenant: str, collection: str, limit: int = 1000,
                             offset: int = 0) -> list[dict[str, Any]] | dict[str, Any]:
        return await self.store.list_documents(tenant, collection, limit, offset)

    async def current_versions(self, tenant: str, collection: str,
                               doc_ids: list[str]) -> dict[str, Any]:
        return await self.store.current_versions(tenant, collection, doc_ids)

    async def maintain(self, force: bool = False) -> dict[str, Any]:
        return await self.store.maintain(force)

    async def stats(self) -> dict[str, Any]:
        return await self.store.stats()

    # ------------------------------------------------------------------ background upkeep
    def _start_maintenance(self) -> None:
        self._maintenance = asyncio.get_running_loop().create_task(self._maintenance_loop())

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.maintenance_interval_s)
            try:
                report = await self.store.maintain()
                worked = [item for item in report.values()
                          if isinstance(item, dict) and item.get("optimized")]
                if worked or "vector_index" in report:
                    log.info("rag maintenance: %s", report)
            except Exception:  # keep serving; try again next period
                log.exception("rag maintenance failed")

    def __del__(self) -> None:
        parsing.parse_in_processes(None)
        self.parser.close()

    async def check_health(self) -> None:
        if self._maintenance is not None and self._maintenance.done():
            log.warning("rag maintenance task stopped; restarting it")
            self._start_maintenance()
