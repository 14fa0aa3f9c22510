"""DocumentStore: the retrieval service's tables (LanceDB), ingestion and hybrid search.

A plain class, used by the Retriever deployment, the tests and the benchmark alike.

- Embedding goes through an injected **async** callable `embed(texts) -> vectors`
  (a list of lists or an array, unit norm, `settings.embedding_dim` wide). In the deployment
  it calls the Embedder; in-process `embed_in_thread(TextEmbedder().embed)` runs the model
  in a worker thread.
- Tenants share the tables; every read and delete is prefiltered by the tenant's `scope`,
  so one tenant never sees another's chunks.
- Writes are serialised by one lock and batched: one ingest call (any number of
  documents) is one commit per table. Replacing a document swaps its chunks in a single
  merge-insert commit (new version in, old versions out), so a search sees either version,
  never both or neither.
- `maintain()` compacts small fragments, folds new rows into the indexes and builds the
  ANN index once the table is large; the deployment runs it in the background.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import ValidationError

from serve_app.errors import ApiError
from serve_app.rag import tables as T
from serve_app.rag.chunking import Chunk, Chunker
from serve_app.rag.config import NAME_PATTERN, RagSettings, SearchMode
from serve_app.rag.fusion import reciprocal_rank_fusion
from serve_app.rag.models import DocumentIn, SearchOptions
from serve_app.rag.parsing import ParsedDocument, load_document
from serve_app.rag.source_ids import source_id

log = logging.getLogger(__name__)

EmbedFn = Callable[[list[str]], Awaitable[Any]]


def embed_in_thread(embed: Callable[[list[str]], Any]) -> EmbedFn:
    """Adapt a blocking embed function (e.g. TextEmbedder.embed) to the store's async one."""

    async def run(texts: list[str]) -> Any:
        return await asyncio.to_thread(embed, texts)

    return run


class DocumentStore:
    """Open with `await DocumentStore.open(uri, settings, embed)`."""

    def __init__(self, db: Any, chunks: Any, documents: Any, collections: Any,
                 settings: RagSettings, embed: EmbedFn) -> None:
        self.db = db
        self.chunks = chunks
        self.documents = documents
        self.collections = collections
        self.settings = settings
        self._embed = embed
        self._chunker = Chunker(settings.chunk_tokens, settings.chunk_overlap_tokens)
        self._write_lock = asyncio.Lock()
        self._known_scopes: set[str] = set()
        self._scope_rows: dict[str, int] = {}
        self._vector_index: str | None = None  # index type when one exists
        self._vector_index_rows = 0  # table rows when the ANN index was (re)trained

    @classmethod
    async def open(cls, uri: str, settings: RagSettings, embed: EmbedFn) -> "DocumentStore":
        import lancedb
        from lancedb.index import FTS, BTree

        interval = (None if settings.read_consistency_s is None
                    else timedelta(seconds=settings.read_consistency_s))
        db = await lancedb.connect_async(uri, read_consistency_interval=interval)
        chunks = await _open_or_create(db, T.CHUNKS, T.chunks_schema(settings.embedding_dim))
        dim = chunks_dim(await chunks.schema())
        if dim != settings.embedding_dim:
            raise ValueError(f"{uri}/{T.CHUNKS} holds {dim}-d vectors but embedding_dim is "
                             f"{settings.embedding_dim}; use another uri or re-ingest")
        documents = await _open_or_create(db, T.DOCUMENTS, T.DOCUMENTS_SCHEMA)
        collections = await _open_or_create(db, T.COLLECTIONS, T.COLLECTIONS_SCHEMA)
        wanted = [
            (chunks, T.FTS_COLUMN, FTS(language="English", stem=True, remove_stop_words=True,
                                       ascii_folding=True)),
            (chunks, "scope", BTree()),
            (chunks, "doc_id", BTree()),
            (documents, "scope", BTree()),
            (documents, "doc_key", BTree()),
        ]
        for table, column, config in wanted:
            existing = {tuple(index.columns) for index in await table.list_indices()}
            if (column,) not in existing:
                await table.create_index(column, config=config)
        store = cls(db, chunks, documents, collections, settings, embed)
        await store._load_vector_index_state()
        return store

    # ================================================================== ingestion
    async def ingest(self, tenant: str, collection: str,
                     documents: Sequence[DocumentIn | Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Add documents, or replace those whose id exists (version + 1). All or nothing:
        every document is validated, parsed and embedded before anything is written."""
        scope = self._scope(tenant, collection)
        if not documents:
            raise ApiError(400, "Give at least one document.", code="invalid_request",
                           param="documents")
        if len(documents) > self.settings.max_documents_per_request:
            raise ApiError(413, f"At most {self.settings.max_documents_per_request} documents "
                           "per request; send the rest in further requests.",
                           code="too_many_documents", param="documents")
        docs = [_validate_document(item, index) for index, item in enumerate(documents)]
        _reject_duplicates(docs)
        for index, doc in enumerate(docs):
            if len(json.dumps(doc.metadata)) > self.settings.max_metadata_bytes:
                raise ApiError(400, f"metadata is larger than {self.settings.max_metadata_bytes}"
                               " bytes as JSON.", code="invalid_metadata",
                               param=f"documents[{index}].metadata")
        prepared = await asyncio.to_thread(self._prepare, docs)
        texts = [embed_text(item.title, chunk) for item in prepared for chunk in item.chunks]
        vectors = await self.embed(texts)

        async with self._write_lock:
            await self._ensure_collection(scope, tenant, collection)
            previous = await self._versions(scope, [doc.id for doc in docs])
            now = int(time.time())
            chunk_rows: list[dict[str, Any]] = []
            doc_rows: list[dict[str, Any]] = []
            results: list[dict[str, Any]] = []
            offset = 0
            for item in prepared:
                before = previous.get(item.doc.id, _Versions())
                version = before.latest + 1
                n = len(item.chunks)
                chunk_rows.extend(self._chunk_rows(scope, tenant, collection, item, version,
                                                   vectors[offset:offset + n], now))
                offset += n
                doc_rows.append(_document_row(scope, tenant, collection, item, version,
                                              before.created_at or now, now))
                results.append({
                    "id": item.doc.id, "version": version, "chunks": n,
                    "replaced": bool(before.live),
                    "source_id": source_id(tenant, collection, item.doc.id, version),
                    "stale_source_ids": [source_id(tenant, collection, item.doc.id, v)
                                         for v in sorted(before.live)],
                    "warnings": item.parsed.warnings,
                })
            replaced = [doc.id for doc in docs if previous.get(doc.id, _Versions()).live]
            data = pa.Table.from_pylist(chunk_rows, schema=await self.chunks.schema())
            if replaced:  # one commit: new versions in, every older chunk of them out
                await (self.chunks.merge_insert("uid")
                       .when_matched_update_all()
                       .when_not_matched_insert_all()
                       .when_not_matched_by_source_delete(
                           T.where(T.scope_filter(scope), T.sql_in("doc_id", replaced)))
                       .execute(data))
            else:
                await self.chunks.add(data)
            await (self.documents.merge_insert("doc_key").when_matched_update_all()
                   .when_not_matched_insert_all()
                   .execute(pa.Table.from_pylist(doc_rows, schema=T.DOCUMENTS_SCHEMA)))
            self._scope_rows.pop(scope, None)
        return results

    async def delete_document(self, tenant: str, collection: str, doc_id: str) -> dict[str, Any]:
        scope = self._scope(tenant, collection)
        await self._require_collection(scope, collection)
        async with self._write_lock:
            versions = (await self._versions(scope, [doc_id])).get(doc_id)
            if versions is None or not versions.live:
                raise ApiError(404, f"Document {doc_id!r} not found in collection "
                               f"{collection!r}.", code="document_not_found", param="id")
            await self.chunks.delete(T.where(T.scope_filter(scope),
                                             f"doc_id = {T.sql_string(doc_id)}"))
            await self.documents.update(
                {"deleted": True, "chunks": 0, "updated_at": int(time.time())},
                where=T.where(T.scope_filter(scope), f"doc_id = {T.sql_string(doc_id)}"))
            self._scope_rows.pop(scope, None)
        return {"deleted": True, "id": doc_id, "version": versions.latest,
                "source_ids": [source_id(tenant, collection, doc_id, v)
                               for v in sorted(versions.live)]}

    async def delete_collection(self, tenant: str, collection: str) -> dict[str, Any]:
        """Drop a collection's chunks; its documents stay as tombstones so that a collection
        created again under this name never reuses a version number."""
        scope = self._scope(tenant, collection)
        await self._require_collection(scope, collection)
        async with self._write_lock:
            rows = await self._select(self.chunks, T.scope_filter(scope), ["doc_id", "version"])
            live = sorted({(row["doc_id"], row["version"]) for row in rows})
            await self.chunks.delete(T.scope_filter(scope))
            await self.documents.update({"deleted": True, "chunks": 0,
                                         "updated_at": int(time.time())},
                                        where=T.where(T.scope_filter(scope), "deleted = false"))
            await self.collections.delete(T.scope_filter(scope))
            self._known_scopes.discard(scope)
            self._scope_rows.pop(scope, None)
        return {"deleted": True, "collection": collection,
                "documents": len({doc for doc, _ in live}),
                "source_ids": [source_id(tenant, collection, doc, v) for doc, v in live]}

    # ================================================================== search
    async def search(self, tenant: str, collection: str, query: str, top_k: int | None = None,
                     mode: SearchMode | str | None = None,
                     filters: Mapping[str, Any] | None = None,
                     query_vector: Sequence[float] | np.ndarray | None = None,
                     ) -> list[dict[str, Any]]:
        """Best chunks first. hybrid: dense and BM25 candidates fused by reciprocal rank;
        `score` is the fused score (hybrid), cosine similarity (dense) or BM25 (bm25).

        `query_vector`: the query's embedding when the caller has it already (the gateway
        embeds the prompt for the cache); the store then does not embed `query` again."""
        scope = self._scope(tenant, collection)
        options = _validate_search(collection, top_k, mode, filters, self.settings)
        top_k = options.top_k or self.settings.default_top_k
        mode = options.mode or self.settings.default_mode
        if not isinstance(query, str) or not query.strip():
            raise ApiError(400, "`query` must be a non-empty string.", code="invalid_query",
                           param="query")
        if len(query) > self.settings.max_query_chars:
            raise ApiError(400, f"`query` is longer than {self.settings.max_query_chars} "
                           "characters.", code="query_too_long", param="query")
        vector = None if query_vector is None else self._check_vector(query_vector)
        await self._require_collection(scope, collection)
        predicate = T.where(T.scope_filter(scope), *T.filters_sql(options.filters))
        dense_n = max(self.settings.dense_candidates, top_k)
        bm25_n = max(self.settings.bm25_candidates, top_k)
        if mode == "dense":
            rows = await self._dense(scope, query, vector, predicate, top_k)
            return [_hit(row, tenant, row["_score"], dense=(rank, row["_score"]))
                    for rank, row in enumerate(rows, 1)]
        if mode == "bm25":
            rows = await self._bm25(query, predicate, top_k)
            return [_hit(row, tenant, row["_score"], bm25=(rank, row["_score"]))
                    for rank, row in enumerate(rows, 1)]
        dense, bm25 = await asyncio.gather(self._dense(scope, query, vector, predicate, dense_n),
                                           self._bm25(query, predicate, bm25_n))
        rows = {row["uid"]: row for row in [*bm25, *dense]}
        fused = reciprocal_rank_fusion([[row["uid"] for row in dense],
                                        [row["uid"] for row in bm25]], k=self.settings.rrf_k)
        dense_scores = {row["uid"]: row["_score"] for row in dense}
        bm25_scores = {row["uid"]: row["_score"] for row in bm25}
        out = []
        for item in fused[:top_k]:
            dense_rank, bm25_rank = item.ranks
            out.append(_hit(rows[item.key], tenant, item.score,
                            dense=(dense_rank, dense_scores.get(item.key)),
                            bm25=(bm25_rank, bm25_scores.get(item.key))))
        return out

    def _check_vector(self, value: Sequence[float] | np.ndarray) -> np.ndarray:
        vector = np.asarray(value, dtype=np.float32)
        if vector.shape != (self.settings.embedding_dim,) or not np.isfinite(vector).all():
            raise ApiError(422, f"query_vector must hold {self.settings.embedding_dim} finite "
                           "numbers.", code="invalid_value", param="query_vector")
        return vector

    async def _dense(self, scope: str, query: str, vector: np.ndarray | None, predicate: str,
                     limit: int) -> list[dict]:
        if vector is None:
            vector = (await self.embed([query]))[0]
        q = (self.chunks.query().nearest_to(vector).column(T.VECTOR_COLUMN)
             .distance_type("cosine").where(predicate)
             .select([*T.RESULT_COLUMNS, "_distance"]).limit(limit))
        exact = (self._vector_index is None
                 or await self._rows_in(scope) <= self.settings.exact_search_max_rows)
        if exact:
            q = q.bypass_vector_index()  # exact and prefiltered: ANN misses small scopes' rows
        elif self._vector_index == "IVF_HNSW_SQ":
            q = q.nprobes(self.settings.vector_nprobes).ef(self.settings.hnsw_ef)
        else:
            q = q.nprobes(self.settings.vector_nprobes)
        rows = await q.to_list()
        for row in rows:
            row["_score"] = 1.0 - float(row.pop("_distance"))
        return rows

    async def _bm25(self, query: str, predicate: str, limit: int) -> list[dict]:
        from lancedb.query import MatchQuery

        # MatchQuery: the query is plain words, never query syntax.
        q = (self.chunks.query().nearest_to_text(MatchQuery(query, T.FTS_COLUMN))
             .where(predicate).select([*T.RESULT_COLUMNS, "_score"]).limit(limit))
        rows = await q.to_list()
        for row in rows:
            row["_score"] = float(row["_score"])
        return rows

    async def embed(self, texts: list[str]) -> np.ndarray:
        """Texts -> (n, dim) float32, in batches of `embed_batch_size`."""
        dim = self.settings.embedding_dim
        parts = []
        for start in range(0, len(texts), self.settings.embed_batch_size):
            batch = texts[start:start + self.settings.embed_batch_size]
            vectors = np.asarray(await self._embed(batch), dtype=np.float32)
            if vectors.shape != (len(batch), dim) or not np.isfinite(vectors).all():
                raise ApiError(502, "The embedder returned malformed vectors.",
                               code="embedding_failed")
            parts.append(vectors)
        return np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)

    # ================================================================== listings
    async def list_collections(self, tenant: str) -> list[dict[str, Any]]:
        _check_tenant(tenant)
        tenant_sql = f"tenant = {T.sql_string(tenant)}"
        collections = await self._select(self.collections, tenant_sql,
                                         ["collection", "created_at"])
        docs = await self._select(self.documents, T.where(tenant_sql, "deleted = false"),
                                  ["collection", "chunks"])
        counts: dict[str, list[int]] = {}
        for row in docs:
            entry = counts.setdefault(row["collection"], [0, 0])
            entry[0] += 1
            entry[1] += row["chunks"]
        listed = []
        for row in collections:
            n_docs, n_chunks = counts.get(row["collection"], [0, 0])
            listed.append({"name": row["collection"], "documents": n_docs, "chunks": n_chunks,
                           "created_at": row["created_at"]})
        return sorted(listed, key=lambda item: item["name"])

    async def list_documents(self, tenant: str, collection: str, limit: int = 1000,
                             offset: int = 0) -> list[dict[str, Any]]:
        scope = self._scope(tenant, collection)
        await self._require_collection(scope, collection)
        if limit < 1 or offset < 0:
            raise ApiError(422, "limit must be positive and offset not negative.",
                           code="invalid_value", param="limit")
        rows = await self._select(self.documents, T.where(T.scope_filter(scope), "deleted = false"),
                                  ["doc_id", "version", "title", "content_type", "metadata",
                                   "chunks", "bytes", "pages", "sha256", "created_at",
                                   "updated_at"])
        rows.sort(key=lambda row: row["doc_id"])
        return [{"id": row["doc_id"], "version": row["version"], "title": row["title"],
                 "content_type": row["content_type"], "metadata": json.loads(row["metadata"]),
                 "chunks": row["chunks"], "bytes": row["bytes"], "pages": row["pages"],
                 "sha256": row["sha256"], "created_at": row["created_at"],
                 "updated_at": row["updated_at"],
                 "source_id": source_id(tenant, collection, row["doc_id"], row["version"])}
                for row in rows[offset:offset + limit]]

    async def current_versions(self, tenant: str, collection: str,
                               doc_ids: Sequence[str]) -> dict[str, int]:
        """Live version of each existing document (absent ids are left out): lets a cache
        check that an answer's sources are still current before storing it."""
        scope = self._scope(tenant, collection)
        found = await self._versions(scope, list(doc_ids))
        return {doc: max(v.live) for doc, v in found.items() if v.live}

    # ================================================================== maintenance
    async def maintain(self, force: bool = False) -> dict[str, Any]:
        """Compact small fragments, fold new rows into the indexes, (re)build the ANN index.
        Cheap when there is nothing to do; holds the write lock while it works."""
        report: dict[str, Any] = {}
        async with self._write_lock:
            for table in (self.chunks, self.documents, self.collections):
                stats = await table.stats()
                fragments = stats["fragment_stats"]
                unindexed = await _unindexed_rows(table)
                due = (force
                       or fragments["num_small_fragments"] >= self.settings.compact_min_fragments
                       or unindexed >= self.settings.index_update_min_rows)
                if due:
                    await table.optimize(
                        cleanup_older_than=timedelta(seconds=self.settings.cleanup_older_than_s))
                report[table.name] = {"rows": stats["num_rows"],
                                      "fragments": fragments["num_fragments"],
                                      "unindexed_rows": unindexed, "optimized": due}
            rows = await self.chunks.count_rows()
            grown = (self._vector_index is not None
                     and rows >= self._vector_index_rows * self.settings.vector_retrain_growth)
            missing = self._vector_index is None
            if rows >= self.settings.vector_index_min_rows and (missing or grown):
                await self._build_vector_index(rows)
                report["vector_index"] = {"built": self._vector_index, "rows": rows}
            self._scope_rows.clear()
        return report

    async def _build_vector_index(self, rows: int) -> None:
        from lancedb.index import HnswSq, IvfFlat

        kind = self.settings.vector_index_type
        if kind == "IVF_HNSW_SQ":
            config: Any = HnswSq(distance_type="cosine", num_partitions=max(1, rows // 100_000),
                                 m=16, ef_construction=100)
        else:
            config = IvfFlat(distance_type="cosine",
                             num_partitions=max(2, rows // self.settings.vector_partition_rows))
        started = time.perf_counter()
        await self.chunks.create_index(T.VECTOR_COLUMN, config=config, replace=True)
        self._vector_index, self._vector_index_rows = kind, rows
        log.info("rag: built %s over %d chunks in %.1fs", kind, rows, time.perf_counter() - started)

    async def _load_vector_index_state(self) -> None:
        for index in await self.chunks.list_indices():
            if list(index.columns) == [T.VECTOR_COLUMN]:
                hnsw = "HNSW" in str(index.index_type).upper()
                self._vector_index = "IVF_HNSW_SQ" if hnsw else "IVF_FLAT"
                self._vector_index_rows = await self.chunks.count_rows()

    async def stats(self) -> dict[str, Any]:
        return {"chunks": await self.chunks.count_rows(),
                "documents": await self.documents.count_rows("deleted = false"),
                "vector_index": self._vector_index}

    # ================================================================== internals
    def _scope(self, tenant: str, collection: str) -> str:
        _check_tenant(tenant)
        _check_collection(collection)
        return T.scope_of(tenant, collection)

    async def _require_collection(self, scope: str, collection: str) -> None:
        if scope in self._known_scopes:
            return
        if await self.collections.count_rows(T.scope_filter(scope)) == 0:
            raise ApiError(404, f"Collection {collection!r} does not exist.",
                           code="collection_not_found", param="collection")
        self._known_scopes.add(scope)

    async def _ensure_collection(self, scope: str, tenant: str, collection: str) -> None:
        if scope in self._known_scopes:
            return
        if await self.collections.count_rows(T.scope_filter(scope)) == 0:
            await self.collections.add(pa.Table.from_pylist(
                [{"scope": scope, "tenant": tenant, "collection": collection,
                  "created_at": int(time.time())}], schema=T.COLLECTIONS_SCHEMA))
        self._known_scopes.add(scope)

    async def _rows_in(self, scope: str) -> int:
        if scope not in self._scope_rows:
            self._scope_rows[scope] = await self.chunks.count_rows(T.scope_filter(scope))
        return self._scope_rows[scope]

    async def _versions(self, scope: str, doc_ids: list[str]) -> dict[str, "_Versions"]:
        """Versions seen per document: chunk versions present (live) and the documents
        table's counter, tombstones included."""
        found: dict[str, _Versions] = {}
        ids = T.sql_in("doc_id", doc_ids)
        for row in await self._select(self.documents, T.where(T.scope_filter(scope), ids),
                                      ["doc_id", "version", "deleted", "created_at"]):
            entry = found.setdefault(row["doc_id"], _Versions())
            entry.counter = max(entry.counter, row["version"])
            entry.created_at = None if row["deleted"] else row["created_at"]
        for row in await self._select(self.chunks, T.where(T.scope_filter(scope), ids),
                                      ["doc_id", "version"]):
            found.setdefault(row["doc_id"], _Versions()).live.add(row["version"])
        return found

    @staticmethod
    async def _select(table: Any, predicate: str, columns: list[str]) -> list[dict[str, Any]]:
        return await table.query().where(predicate).select(columns).to_list()

    def _prepare(self, docs: list[DocumentIn]) -> list["_Prepared"]:
        prepared = []
        for index, doc in enumerate(docs):
            parsed = load_document(doc, self.settings, f"documents[{index}]")
            chunks = self._chunker.split(parsed.blocks)
            if len(chunks) > self.settings.max_chunks_per_document:
                raise ApiError(413, f"Document {doc.id!r} makes {len(chunks)} chunks; at most "
                               f"{self.settings.max_chunks_per_document} are accepted.",
                               code="document_too_large", param=f"documents[{index}]")
            title = (doc.title or "").strip() or parsed.title or doc.id
            raw = (doc.content.encode("utf-8", errors="surrogatepass") if doc.content is not None
                   else base64.b64decode(doc.content_b64 or ""))
            digest = hashlib.sha256(raw).hexdigest()
            prepared.append(_Prepared(doc, parsed, chunks, title, digest))
        return prepared

    def _chunk_rows(self, scope: str, tenant: str, collection: str, item: "_Prepared",
                    version: int, vectors: np.ndarray, now: int) -> list[dict[str, Any]]:
        metadata = json.dumps(item.doc.metadata, ensure_ascii=False, sort_keys=True)
        terms = T.metadata_terms(item.doc.metadata)
        return [{
            "uid": T.chunk_uid(scope, item.doc.id, version, chunk.index),
            "scope": scope, "tenant": tenant, "collection": collection,
            "doc_id": item.doc.id, "version": version, "chunk_index": chunk.index,
            "chunk_id": T.chunk_id(item.doc.id, version, chunk.index),
            "title": item.title, "heading": chunk.heading, "text": chunk.text,
            T.FTS_COLUMN: embed_text(item.title, chunk), "page": chunk.page,
            "metadata": metadata, "meta_kv": terms, "created_at": now,
            T.VECTOR_COLUMN: vector,
        } for chunk, vector in zip(item.chunks, vectors)]


# ---------------------------------------------------------------------------- helpers
class _Versions:
    def __init__(self) -> None:
        self.counter = 0           # highest version the documents table recorded
        self.live: set[int] = set()  # versions with chunks in the table
        self.created_at: int | None = None

    @property
    def latest(self) -> int:
        return max([self.counter, *self.live])


class _Prepared:
    def __init__(self, doc: DocumentIn, parsed: ParsedDocument, chunks: list[Chunk],
                 title: str, digest: str) -> None:
        self.doc, self.parsed, self.chunks, self.title, self.digest = (
            doc, parsed, chunks, title, digest)


def embed_text(title: str, chunk: Chunk) -> str:
    """What the embedder and BM25 see for a chunk: title, heading path, text."""
    return "\n".join(part for part in (title, chunk.heading, chunk.text) if part)


def chunks_dim(schema: pa.Schema) -> int:
    return schema.field(T.VECTOR_COLUMN).type.list_size


def _document_row(scope: str, tenant: str, collection: str, item: _Prepared, version: int,
                  created_at: int, now: int) -> dict[str, Any]:
    return {"doc_key": T.doc_key(scope, item.doc.id), "scope": scope, "tenant": tenant,
            "collection": collection, "doc_id": item.doc.id, "version": version,
            "title": item.title, "content_type": item.parsed.content_type,
            "metadata": json.dumps(item.doc.metadata, ensure_ascii=False, sort_keys=True),
            "chunks": len(item.chunks), "bytes": item.parsed.n_bytes,
            "pages": item.parsed.pages, "sha256": item.digest, "deleted": False,
            "created_at": created_at, "updated_at": now}


def _hit(row: dict[str, Any], tenant: str, score: float,
         dense: tuple[int | None, float | None] = (None, None),
         bm25: tuple[int | None, float | None] = (None, None)) -> dict[str, Any]:
    return {
        "chunk_id": row["chunk_id"], "document_id": row["doc_id"], "version": row["version"],
        "chunk_index": row["chunk_index"], "collection": row["collection"],
        "title": row["title"], "heading": row["heading"], "text": row["text"],
        "page": row["page"], "metadata": json.loads(row["metadata"]),
        "score": float(score),
        "dense_rank": dense[0], "dense_score": dense[1],
        "bm25_rank": bm25[0], "bm25_score": bm25[1],
        "source_id": source_id(tenant, row["collection"], row["doc_id"], row["version"]),
    }


async def _open_or_create(db: Any, name: str, schema: pa.Schema) -> Any:
    try:
        return await db.open_table(name)
    except ValueError:  # lancedb: "Table '...' was not found"
        return await db.create_table(name, schema=schema, exist_ok=True)


async def _unindexed_rows(table: Any) -> int:
    most = 0
    for index in await table.list_indices():
        stats = await table.index_stats(index.name)
        if stats is not None:
            most = max(most, stats.num_unindexed_rows)
    return most


def _check_tenant(tenant: str) -> None:
    if not isinstance(tenant, str) or not NAME_PATTERN.match(tenant):
        raise ApiError(400, "Invalid tenant name.", code="invalid_tenant", param="tenant")


def _check_collection(collection: str) -> None:
    from serve_app.rag.models import check_collection_name

    try:
        check_collection_name(collection if isinstance(collection, str) else "")
    except ValueError as exc:
        raise ApiError(400, str(exc), code="invalid_collection", param="collection") from exc


def _validate_document(item: DocumentIn | Mapping[str, Any], index: int) -> DocumentIn:
    if isinstance(item, DocumentIn):
        return item
    try:
        return DocumentIn.model_validate(item)
    except ValidationError as exc:
        raise _validation_error(exc, f"documents[{index}]") from exc


def _validate_search(collection: str, top_k: int | None, mode: str | None,
                     filters: Mapping[str, Any] | None, settings: RagSettings) -> SearchOptions:
    try:
        options = SearchOptions.model_validate({"collection": collection, "top_k": top_k,
                                                "mode": mode, "filters": filters})
    except ValidationError as exc:
        raise _validation_error(exc, "") from exc
    if options.top_k is not None and options.top_k > settings.max_top_k:
        raise ApiError(422, f"top_k must be at most {settings.max_top_k}.",
                       code="invalid_value", param="top_k")
    return options


def _validation_error(exc: ValidationError, prefix: str) -> ApiError:
    first = exc.errors()[0]
    loc = ".".join(str(part) for part in first.get("loc", ()) if part != "__root__")
    param = ".".join(part for part in (prefix, loc) if part) or None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return ApiError(422, f"{param}: {message}" if param else message, code="invalid_value",
                    param=param)


def _reject_duplicates(docs: list[DocumentIn]) -> None:
    seen: set[str] = set()
    for index, doc in enumerate(docs):
        if doc.id in seen:
            raise ApiError(400, f"Document id {doc.id!r} appears twice in one request.",
                           code="duplicate_document", param=f"documents[{index}].id")
        seen.add(doc.id)
