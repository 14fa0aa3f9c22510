"""Retrieval routes: a tenant's collections and documents (ingest, replace, delete, list,
PDF upload) and POST /v1/retrieve. A tenant key works on its own tenant; the admin key
names the tenant with `?tenant=`. Changing a document invalidates the cached answers
built from its earlier versions."""
from __future__ import annotations

import base64
import json
from typing import Any

from fastapi import File, Form, Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from deployments.gateway.fastapi_app import api_key_of, app
from serve_app.errors import ApiError
from serve_app.rag.models import DocumentIn, RetrieveRequest


class DocumentBatch(BaseModel):
    """Body of POST /v1/collections/{collection}/documents."""

    model_config = ConfigDict(extra="forbid")

    documents: list[DocumentIn] = Field(min_length=1)


class RagRoutes:
    async def tenant_of(self, request: Request, tenant: str | None) -> str:
        token = api_key_of(request)
        if tenant is not None:
            if not token or not await self.quota.call("is_admin", token):
                raise ApiError(403, "Only the admin key may name a tenant.", code="not_admin",
                               param="tenant")
            return tenant
        return (await self.authenticate(request))["tenant_id"]

    async def _invalidate_sources(self, source_ids: list[str]) -> None:
        for source_id in source_ids:
            await self.cache.call("invalidate", "source", source_id, None)

    async def _ingest(self, tenant: str, collection: str,
                      documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results = await self.retriever.call("ingest", tenant, collection, documents,
                                            timeout_s=self.retriever.ingest_timeout_s)
        for result in results:
            await self._invalidate_sources(result.get("stale_source_ids") or [])
        return results

    @app.get("/v1/collections")
    async def rag_collections(self, request: Request,
                              tenant: str | None = None) -> dict[str, Any]:
        owner = await self.tenant_of(request, tenant)
        return {"object": "list", "data": await self.retriever.call("list_collections", owner)}

    @app.post("/v1/collections/{collection}/documents", status_code=201)
    async def rag_add_documents(self, collection: str, body: DocumentBatch, request: Request,
                                tenant: str | None = None) -> JSONResponse:
        """Add documents; an existing id is replaced (its version goes up)."""
        owner = await self.tenant_of(request, tenant)
        documents = [d.model_dump(exclude_none=True) for d in body.documents]
        return JSONResponse({"object": "list",
                             "data": await self._ingest(owner, collection, documents)},
                            status_code=201)

    @app.put("/v1/collections/{collection}/documents/{doc_id}")
    async def rag_replace_document(self, collection: str, doc_id: str, body: DocumentIn,
                                   request: Request, tenant: str | None = None) -> dict[str, Any]:
        owner = await self.tenant_of(request, tenant)
        if body.id != doc_id:
            raise ApiError(422, "the body's id must match the path", param="id")
        return (await self._ingest(owner, collection, [body.model_dump(exclude_none=True)]))[0]

    @app.post("/v1/collections/{collection}/files", status_code=201)
    async def rag_upload_file(self, collection: str, request: Request,
                              file: UploadFile = File(...), id: str | None = Form(None),
                              title: str | None = Form(None),
                              metadata: str | None = Form(None),
                              tenant: str | None = None) -> JSONResponse:
        """Multipart upload (PDF, markdown, text); the type comes from the part's header."""
        owner = await self.tenant_of(request, tenant)
        try:
            meta = json.loads(metadata) if metadata else {}
        except json.JSONDecodeError as exc:
            raise ApiError(400, "metadata must be a JSON object", param="metadata") from exc
        content = await file.read()
        document = {"id": id or file.filename or "upload", "title": title or file.filename,
                    "content_b64": base64.b64encode(content).decode(),
                    "content_type": file.content_type, "metadata": meta}
        result = await self._ingest(owner, collection, [document])
        return JSONResponse(result[0], status_code=201)

    @app.get("/v1/collections/{collection}/documents")
    async def rag_list_documents(self, collection: str, request: Request,
                                 tenant: str | None = None, limit: int = 1000,
                                 offset: int = 0) -> dict[str, Any]:
        owner = await self.tenant_of(request, tenant)
        return {"object": "list", "data": await self.retriever.call(
            "list_documents", owner, collection, max(1, min(limit, 10_000)), max(0, offset))}

    @app.delete("/v1/collections/{collection}/documents/{doc_id}")
    async def rag_delete_document(self, collection: str, doc_id: str, request: Request,
                                  tenant: str | None = None) -> dict[str, Any]:
        owner = await self.tenant_of(request, tenant)
        result = await self.retriever.call("delete_document", owner, collection, doc_id)
        await self._invalidate_sources(result.get("source_ids") or [])
        return result

    @app.delete("/v1/collections/{collection}")
    async def rag_delete_collection(self, collection: str, request: Request,
                                    tenant: str | None = None) -> dict[str, Any]:
        owner = await self.tenant_of(request, tenant)
        result = await self.retriever.call("delete_collection", owner, collection)
        await self._invalidate_sources(result.get("source_ids") or [])
        return result

    @app.post("/v1/retrieve")
    async def rag_retrieve(self, body: RetrieveRequest, request: Request,
                           tenant: str | None = None) -> dict[str, Any]:
        """Chunks for a query, without calling a model."""
        owner = await self.tenant_of(request, tenant)
        chunks = await self.retriever.call("search", owner, body.collection, body.query,
                                           body.top_k, body.mode, body.filters, None)
        return {"object": "list", "collection": body.collection, "data": chunks}
