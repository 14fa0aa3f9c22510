"""Retrieval routes: a tenant's collections and documents (ingest, replace, delete, list,
PDF upload) and POST /v1/retrieve. A tenant key works on its own tenant; the admin key
names the tenant with `?tenant=`. Changing a document invalidates the cached answers
built from its earlier versions."""
from __future__ import annotations

import base64
import json
from typing import Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from deployments.gateway.dependencies import CallerDep, GatewayDep, tenant_scope
from serve_app.errors import ApiError
from serve_app.rag.models import DocumentIn, RetrieveRequest

router = APIRouter()


class DocumentBatch(BaseModel):
    """Body of POST /v1/collections/{collection}/documents."""

    model_config = ConfigDict(extra="forbid")

    documents: list[DocumentIn] = Field(min_length=1)


async def _invalidate_sources(gateway: Any, source_ids: list[str]) -> None:
    for source_id in source_ids:
        await gateway.cache.call("invalidate", "source", source_id, None)


async def _ingest(gateway: Any, tenant: str, collection: str,
                  documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results = await gateway.retriever.call("ingest", tenant, collection, documents,
                                           timeout_s=gateway.retriever.ingest_timeout_s)
    for result in results:
        await _invalidate_sources(gateway, result.get("stale_source_ids") or [])
    return results


async def _delete(gateway: Any, method: str, *args: str) -> dict[str, Any]:
    """A Retriever deletion, then the cached answers built from what it deleted."""
    result = await gateway.retriever.call(method, *args)
    await _invalidate_sources(gateway, result.get("source_ids") or [])
    return result


@router.get("/v1/collections")
async def rag_collections(gateway: GatewayDep, caller: CallerDep,
                          tenant: str | None = None) -> dict[str, Any]:
    owner = tenant_scope(caller, tenant)
    return {"object": "list", "data": await gateway.retriever.call("list_collections", owner)}


@router.post("/v1/collections/{collection}/documents", status_code=201)
async def rag_add_documents(collection: str, body: DocumentBatch, gateway: GatewayDep,
                            caller: CallerDep, tenant: str | None = None) -> JSONResponse:
    """Add documents; an existing id is replaced (its version goes up)."""
    owner = tenant_scope(caller, tenant)
    documents = [d.model_dump(exclude_none=True) for d in body.documents]
    return JSONResponse({"object": "list",
                         "data": await _ingest(gateway, owner, collection, documents)},
                        status_code=201)


@router.put("/v1/collections/{collection}/documents/{doc_id}")
async def rag_replace_document(collection: str, doc_id: str, body: DocumentIn,
                               gateway: GatewayDep, caller: CallerDep,
                               tenant: str | None = None) -> dict[str, Any]:
    owner = tenant_scope(caller, tenant)
    if body.id != doc_id:
        raise ApiError(422, "the body's id must match the path", param="id")
    return (await _ingest(gateway, owner, collection,
                          [body.model_dump(exclude_none=True)]))[0]


@router.post("/v1/collections/{collection}/files", status_code=201)
async def rag_upload_file(collection: str, gateway: GatewayDep, caller: CallerDep,
                          file: UploadFile = File(...), id: str | None = Form(None),
                          title: str | None = Form(None), metadata: str | None = Form(None),
                          tenant: str | None = None) -> JSONResponse:
    """Multipart upload (PDF, markdown, text); the type comes from the part's header."""
    owner = tenant_scope(caller, tenant)
    try:
        meta = json.loads(metadata) if metadata else {}
    except json.JSONDecodeError as exc:
        raise ApiError(400, "metadata must be a JSON object", param="metadata") from exc
    content = await file.read()
    document = {"id": id or file.filename or "upload", "title": title or file.filename,
                "content_b64": base64.b64encode(content).decode(),
                "content_type": file.content_type, "metadata": meta}
    result = await _ingest(gateway, owner, collection, [document])
    return JSONResponse(result[0], status_code=201)


@router.get("/v1/collections/{collection}/documents")
async def rag_list_documents(collection: str, gateway: GatewayDep, caller: CallerDep,
                             tenant: str | None = None, limit: int = 1000,
                             offset: int = 0) -> dict[str, Any]:
    owner = tenant_scope(caller, tenant)
    return {"object": "list", "data": await gateway.retriever.call(
        "list_documents", owner, collection, max(1, min(limit, 10_000)), max(0, offset))}


@router.delete("/v1/collections/{collection}/documents/{doc_id}")
async def rag_delete_document(collection: str, doc_id: str, gateway: GatewayDep,
                              caller: CallerDep, tenant: str | None = None) -> dict[str, Any]:
    return await _delete(gateway, "delete_document", tenant_scope(caller, tenant), collection,
                         doc_id)


@router.delete("/v1/collections/{collection}")
async def rag_delete_collection(collection: str, gateway: GatewayDep, caller: CallerDep,
                                tenant: str | None = None) -> dict[str, Any]:
    return await _delete(gateway, "delete_collection", tenant_scope(caller, tenant), collection)


@router.post("/v1/retrieve")
async def rag_retrieve(body: RetrieveRequest, gateway: GatewayDep, caller: CallerDep,
                       tenant: str | None = None) -> dict[str, Any]:
    """Chunks for a query, without calling a model."""
    owner = tenant_scope(caller, tenant)
    chunks = await gateway.retriever.call("search", owner, body.collection, body.query,
                                          body.top_k, body.mode, body.filters, None)
    return {"object": "list", "collection": body.collection, "data": chunks}
