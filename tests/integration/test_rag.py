"""RAG through HTTP: ingestion, hybrid search, versions, tenant isolation, chat with
sources (streamed too), cache coherence on document changes, ledger chunks, bad input."""
from __future__ import annotations

import base64

import httpx
import pytest
from openai import OpenAI

from tests.support.keys import admin_client, create_key
from tests.support.pdf import make_pdf

MODEL = "smollm2-135m-instruct"
HANDBOOK_V1 = """# Employee handbook

## Holidays

Every employee gets 25 days of paid holiday per year. Holidays must be booked in the
HR portal at least two weeks in advance.

## Travel

Book trains for trips under 500 km. Flights need approval from a director.
"""
HANDBOOK_V2 = HANDBOOK_V1.replace("25 days", "30 days")


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("rag")
    cluster.deploy_stack(data_dir, {
        "cache": {"flush_interval_s": 0.2},
        "rag": {"model_aliases": {"handbook-bot": {"model": MODEL, "collection": "handbook",
                                                   "top_k": 2}},
                "max_document_bytes": 200_000}})
    cluster.data_dir = data_dir
    cluster.keys = {t: create_key(cluster.base_url, tenant=t) for t in ("alpha", "beta")}
    return cluster


def http(stack, tenant: str = "alpha") -> httpx.Client:
    return httpx.Client(base_url=stack.base_url, timeout=600,
                        headers={"authorization": f"Bearer {stack.keys[tenant]['key']}"})


def ingest(stack, collection: str, documents: list[dict], tenant: str = "alpha") -> httpx.Response:
    with http(stack, tenant) as client:
        return client.post(f"/v1/collections/{collection}/documents",
                           json={"documents": documents})


def retrieve(stack, query: str, collection: str = "handbook", tenant: str = "alpha",
             **options) -> httpx.Response:
    with http(stack, tenant) as client:
        return client.post("/v1/retrieve", json={"collection": collection, "query": query,
                                                 **options})


def chat(stack, question: str, **extra) -> httpx.Response:
    with http(stack) as client:
        response = client.post("/v1/chat/completions", json={
            "model": MODEL, "temperature": 0, "max_tokens": 24,
            "messages": [{"role": "user", "content": question}], **extra})
    assert response.status_code == 200, response.text
    return response


def test_ingest_search_and_list(stack):
    response = ingest(stack, "handbook", [
        {"id": "handbook", "title": "Employee handbook", "content": HANDBOOK_V1,
         "content_type": "text/markdown", "metadata": {"team": "hr"}},
        {"id": "wings", "title": "Wing design", "content":
         "Swept wings delay the onset of shock waves at transonic speeds.",
         "metadata": {"team": "aero"}}])
    assert response.status_code == 201, response.text
    results = {r["id"]: r for r in response.json()["data"]}
    assert results["handbook"]["version"] == 1 and results["handbook"]["chunks"] >= 2
    found = retrieve(stack, "How many paid holiday days do employees get?").json()["data"]
    assert found[0]["document_id"] == "handbook" and "25 days" in found[0]["text"]
    assert "Holidays" in (found[0]["heading"] or "")
    filtered = retrieve(stack, "holiday", filters={"team": "aero"}).json()["data"]
    assert {c["document_id"] for c in filtered} == {"wings"}
    for mode in ("bm25", "dense"):
        assert retrieve(stack, "shock waves", mode=mode).json()["data"][0]["document_id"] == "wings"
    with http(stack) as client:
        collections = client.get("/v1/collections").json()["data"]
        documents = client.get("/v1/collections/handbook/documents").json()["data"]
    assert {"handbook"} <= {c["name"] for c in collections}
    assert {d["id"] for d in documents} == {"handbook", "wings"}


def test_tenants_never_see_each_other(stack):
    other = retrieve(stack, "holiday", tenant="beta")
    assert other.status_code == 404
    assert other.json()["error"]["code"] == "collection_not_found"
    ingest(stack, "handbook", [{"id": "beta-doc", "content": "Beta's own holiday rules."}],
           tenant="beta")
    found = retrieve(stack, "holiday rules", tenant="beta").json()["data"]
    assert {c["document_id"] for c in found} == {"beta-doc"}
    assert "beta-doc" not in {c["document_id"]
                              for c in retrieve(stack, "holiday rules").json()["data"]}


def test_chat_with_rag_returns_sources_in_body_headers_and_ledger(stack):
    response = chat(stack, "How many days of paid holiday do I get?",
                    rag={"collection": "handbook", "top_k": 2})
    body = response.json()
    assert body["sources"][0]["document_id"] == "handbook"
    assert body["sources"][0]["version"] == 1 and body["sources"][0]["chunk_id"]
    assert "25 days" in body["sources"][0]["snippet"]
    assert response.headers["x-rag-sources"].startswith("1=handbook@1#")
    with admin_client(stack.base_url) as admin:
        row = admin.get(f"/admin/v1/usage/requests/{response.headers['x-llmstack-request-id']}").json()
    assert any(ref.startswith("doc:alpha/handbook/handbook@1#") for ref in row["sources"])


def test_model_alias_turns_rag_on_and_streaming_carries_sources(stack):
    client = OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.keys["alpha"]["key"])
    chunks = list(client.chat.completions.create(
        model="handbook-bot", stream=True, temperature=0, max_tokens=16,
        messages=[{"role": "user", "content": "Do flights need approval?"}]))
    first = chunks[0].model_extra
    assert first["sources"] and first["sources"][0]["document_id"] == "handbook"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_replacing_a_document_bumps_the_version_and_invalidates_cached_answers(stack):
    question = "What does the handbook say about holiday days?"
    rag = {"collection": "handbook", "top_k": 2}
    assert chat(stack, question, rag=rag).headers["x-cache"] == "miss"
    import time

    time.sleep(0.6)
    cached = chat(stack, question, rag=rag)
    assert cached.headers["x-cache"] == "hit" and cached.json()["sources"]
    replaced = ingest(stack, "handbook", [{"id": "handbook", "title": "Employee handbook",
                                           "content": HANDBOOK_V2,
                                           "content_type": "text/markdown"}])
    result = replaced.json()["data"][0]
    assert result["version"] == 2 and result["replaced"]
    chunks = retrieve(stack, "paid holiday days").json()["data"]
    handbook = [c for c in chunks if c["document_id"] == "handbook"]
    assert handbook and all(c["version"] == 2 for c in handbook)
    assert all("25 days" not in c["text"] for c in handbook)
    fresh = chat(stack, question, rag=rag)
    assert fresh.headers["x-cache"] == "miss"
    assert fresh.json()["sources"][0]["version"] == 2


def test_delete_document_removes_its_chunks(stack):
    ingest(stack, "scratch", [{"id": "temp", "content": "Zebras have black and white stripes."}])
    assert retrieve(stack, "zebra stripes", collection="scratch").json()["data"]
    with http(stack) as client:
        deleted = client.delete("/v1/collections/scratch/documents/temp")
        assert deleted.status_code == 200 and deleted.json()["deleted"]
        assert client.delete("/v1/collections/scratch/documents/temp").status_code == 404
    assert retrieve(stack, "zebra stripes", collection="scratch").json()["data"] == []


def test_pdf_upload(stack):
    pdf = make_pdf([["Safety manual", "Wear goggles in the laboratory at all times."]])
    with http(stack) as client:
        response = client.post("/v1/collections/manuals/files",
                               files={"file": ("safety.pdf", pdf, "application/pdf")},
                               data={"id": "safety", "title": "Safety manual"})
    assert response.status_code == 201, response.text
    found = retrieve(stack, "goggles in the lab", collection="manuals").json()["data"]
    assert found[0]["document_id"] == "safety" and found[0]["page"] == 1


@pytest.mark.parametrize("document,status,code", [
    ({"id": "empty", "content": "   "}, 400, "empty_document"),
    ({"id": "bin", "content_b64": base64.b64encode(b"\x00\x01").decode(),
      "content_type": "application/zip"}, 415, "unsupported_media_type"),
    ({"id": "big", "content": "word " * 60_000}, 413, "document_too_large"),
])
def test_bad_documents_get_clear_4xx_and_nothing_is_written(stack, document, status, code):
    response = ingest(stack, "handbook", [document])
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    with http(stack) as client:
        ids = {d["id"] for d in client.get("/v1/collections/handbook/documents").json()["data"]}
    assert document["id"] not in ids


def test_unknown_collection_and_oversized_upload(stack):
    assert retrieve(stack, "anything", collection="nope").status_code == 404
    missing = chat_status(stack, rag={"collection": "nope"})
    assert missing.status_code == 404
    with http(stack) as client:
        huge = client.post("/v1/collections/handbook/files",
                           files={"file": ("big.txt", b"x" * 21_000_000, "text/plain")})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"


def chat_status(stack, **extra) -> httpx.Response:
    with http(stack) as client:
        return client.post("/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}], **extra})
