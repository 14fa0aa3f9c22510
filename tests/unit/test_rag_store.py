"""DocumentStore on a real LanceDB directory with real embeddings (all-MiniLM-L6-v2)."""
from __future__ import annotations

import asyncio
import base64

import pytest

from serve_app.errors import ApiError
from serve_app.rag.config import RagSettings
from serve_app.rag.source_ids import parse_source_id
from serve_app.rag.store import DocumentStore, embed_in_thread
from tests.support.pdf import make_pdf

WINGS = ("# Wings\nA wing in a propeller slipstream gains lift; the spanwise lift increase "
         "depends on the angle of attack.\n\n## Stall\nPast the critical angle the flow "
         "separates from the upper surface and lift collapses.")
HEAT = "Heat conduction in composite slabs is solved with Laplace transforms."
KITCHEN = "Whisk the eggs with sugar, fold in flour and bake the sponge cake for 25 minutes."


@pytest.fixture(scope="module")
def embed():
    from serve_app.embedding import TextEmbedder

    return embed_in_thread(TextEmbedder().embed)


@pytest.fixture
async def store(tmp_path, embed):
    return await DocumentStore.open(str(tmp_path / "rag"), RagSettings(), embed)


async def seed(store: DocumentStore, tenant: str = "acme", collection: str = "docs") -> None:
    await store.ingest(tenant, collection, [
        {"id": "wings", "content": WINGS, "content_type": "text/markdown",
         "metadata": {"lang": "en", "year": 1960, "tags": ["aero", "lift"]}},
        {"id": "heat", "title": "Heat", "content": HEAT, "metadata": {"lang": "en", "year": 1961}},
        {"id": "cake", "title": "Sponge cake", "content": KITCHEN, "metadata": {"lang": "fr"}},
    ])


async def error_of(awaitable) -> ApiError:
    with pytest.raises(ApiError) as info:
        await awaitable
    return info.value


def doc_ids(hits) -> list[str]:
    return [hit["document_id"] for hit in hits]


# ---------------------------------------------------------------------------- ingest + search
async def test_ingest_reports_versions_chunks_and_source_ids(store):
    results = await store.ingest("acme", "docs", [{"id": "wings", "content": WINGS,
                                                   "content_type": "text/markdown"}])
    assert results == [{"id": "wings", "version": 1, "chunks": 2, "replaced": False,
                        "source_id": "doc:acme/docs/wings@1", "stale_source_ids": [],
                        "warnings": []}]


@pytest.mark.parametrize("mode", ["hybrid", "dense", "bm25"])
async def test_each_mode_finds_the_relevant_document_first(store, mode):
    await seed(store)
    hits = await store.search("acme", "docs", "why does a wing lose lift past the critical angle",
                              top_k=3, mode=mode)
    assert hits[0]["document_id"] == "wings"
    assert hits[0]["heading"] == "Wings > Stall"
    assert hits[0]["title"] == "Wings"
    assert hits[0]["source_id"] == "doc:acme/docs/wings@1"
    assert [hit["score"] for hit in hits] == sorted((hit["score"] for hit in hits), reverse=True)


async def test_dense_finds_a_paraphrase_that_shares_no_words(store):
    await seed(store)
    hits = await store.search("acme", "docs", "a sweet pastry dessert", top_k=1, mode="dense")
    assert doc_ids(hits) == ["cake"]
    assert await store.search("acme", "docs", "a sweet pastry dessert", top_k=3, mode="bm25") == []


async def test_a_given_query_vector_is_used_instead_of_embedding_the_query(store):
    await seed(store)
    vector = (await store.embed(["a sweet pastry dessert"]))[0]
    hits = await store.search("acme", "docs", "heat", top_k=1, mode="dense", query_vector=vector)
    assert doc_ids(hits) == ["cake"]  # the vector decides, not the text
    hybrid = await store.search("acme", "docs", "heat", top_k=3, query_vector=vector.tolist())
    assert hybrid[0]["dense_rank"] is not None and {"cake", "heat"} <= set(doc_ids(hybrid))
    error = await error_of(store.search("acme", "docs", "x", query_vector=[0.1] * 3))
    assert (error.status, error.param) == (422, "query_vector")


async def test_hybrid_reports_both_ranks(store):
    await seed(store)
    hits = await store.search("acme", "docs", "heat conduction slabs", top_k=3)
    top = hits[0]
    assert top["document_id"] == "heat"
    assert top["dense_rank"] == 1 and top["bm25_rank"] == 1
    assert top["score"] == pytest.approx(2 / 61)


async def test_pdf_ingestion_keeps_pages(store):
    pdf = make_pdf([["Introduction to the report."], ["Turbine blade cooling uses film air."]],
                   outline=[("Intro", 0, None), ("Cooling", 1, None)], title="Engine report")
    results = await store.ingest("acme", "docs", [
        {"id": "report.pdf", "content_b64": base64.b64encode(pdf).decode(),
         "content_type": "application/pdf"}])
    assert results[0]["chunks"] == 2
    hits = await store.search("acme", "docs", "turbine blade cooling", top_k=1)
    assert hits[0]["page"] == 2 and hits[0]["heading"] == "Cooling"
    assert hits[0]["title"] == "Engine report"
    listed = await store.list_documents("acme", "docs")
    assert listed[0]["content_type"] == "application/pdf" and listed[0]["pages"] == 2


# ---------------------------------------------------------------------------- replace + delete
async def test_replace_bumps_version_and_removes_old_chunks(store):
    await seed(store)
    result = await store.ingest("acme", "docs", [{"id": "heat", "title": "Heat v2",
                                                  "content": "Radiative cooling of satellites."}])
    assert result[0]["version"] == 2 and result[0]["replaced"]
    assert result[0]["stale_source_ids"] == ["doc:acme/docs/heat@1"]
    for mode in ("hybrid", "dense", "bm25"):
        hits = await store.search("acme", "docs", "heat conduction in composite slabs",
                                  top_k=10, mode=mode)
        assert all(hit["version"] == 2 for hit in hits if hit["document_id"] == "heat")
        assert not any("Laplace" in hit["text"] for hit in hits)
    hits = await store.search("acme", "docs", "radiative cooling of satellites", top_k=1)
    assert (hits[0]["document_id"], hits[0]["version"], hits[0]["title"]) == ("heat", 2, "Heat v2")
    assert hits[0]["chunk_id"] == "heat@2#0"
    listed = {doc["id"]: doc for doc in await store.list_documents("acme", "docs")}
    assert listed["heat"]["version"] == 2 and listed["heat"]["title"] == "Heat v2"
    assert await store.chunks.count_rows("doc_id = 'heat'") == 1


async def test_concurrent_replacements_get_distinct_versions(store):
    await seed(store)
    results = await asyncio.gather(*(store.ingest("acme", "docs", [
        {"id": "heat", "content": f"Revision {n} of the heat note."}]) for n in range(3)))
    assert sorted(r[0]["version"] for r in results) == [2, 3, 4]
    rows = await store.chunks.query().where("doc_id = 'heat'").select(["version"]).to_list()
    assert [row["version"] for row in rows] == [4]


async def test_delete_removes_chunks_and_versions_keep_counting(store):
    await seed(store)
    deleted = await store.delete_document("acme", "docs", "wings")
    assert deleted == {"deleted": True, "id": "wings", "version": 1,
                       "source_ids": ["doc:acme/docs/wings@1"]}
    for mode in ("hybrid", "dense", "bm25"):
        hits = await store.search("acme", "docs", "wing slipstream lift stall", top_k=10,
                                  mode=mode)
        assert "wings" not in doc_ids(hits)
    assert "wings" not in [doc["id"] for doc in await store.list_documents("acme", "docs")]
    error = await error_of(store.delete_document("acme", "docs", "wings"))
    assert error.status == 404
    again = await store.ingest("acme", "docs", [{"id": "wings", "content": "Back again."}])
    assert again[0]["version"] == 2 and not again[0]["replaced"]
    assert again[0]["stale_source_ids"] == []


async def test_delete_collection(store):
    await seed(store)
    result = await store.delete_collection("acme", "docs")
    assert result["documents"] == 3
    assert sorted(result["source_ids"]) == ["doc:acme/docs/cake@1", "doc:acme/docs/heat@1",
                                            "doc:acme/docs/wings@1"]
    assert (await error_of(store.search("acme", "docs", "wing"))).status == 404
    assert await store.list_collections("acme") == []
    again = await store.ingest("acme", "docs", [{"id": "heat", "content": "New heat note."}])
    assert again[0]["version"] == 2 and again[0]["stale_source_ids"] == []
    listed = await store.list_collections("acme")
    assert [(c["name"], c["documents"]) for c in listed] == [("docs", 1)]


# ---------------------------------------------------------------------------- tenants
async def test_a_tenant_never_retrieves_another_tenants_chunks(store):
    await seed(store, tenant="acme")
    await store.ingest("globex", "docs", [{"id": "memo", "content": "Quarterly sales memo."}])
    query = "A wing in a propeller slipstream gains lift"  # verbatim from acme's document
    for mode in ("hybrid", "dense", "bm25"):
        hits = await store.search("globex", "docs", query, top_k=50, mode=mode)
        assert doc_ids(hits) in ([], ["memo"])
        assert all(parse_source_id(hit["source_id"]).tenant == "globex" for hit in hits)
    # Filters cannot widen the scope either.
    hits = await store.search("globex", "docs", query, top_k=50,
                              filters={"document_id": ["wings", "heat", "memo"]})
    assert doc_ids(hits) == ["memo"]
    assert (await error_of(store.delete_document("globex", "docs", "wings"))).status == 404
    assert [c["name"] for c in await store.list_collections("globex")] == ["docs"]
    assert [d["id"] for d in await store.list_documents("globex", "docs")] == ["memo"]
    assert (await error_of(store.search("initech", "docs", "wing"))).status == 404


async def test_hostile_ids_are_literals_not_sql(store):
    evil = "x' OR '1'='1"
    await store.ingest("acme", "docs", [
        {"id": evil, "content": "Evil document about gliders."},
        {"id": "plain", "content": "Plain document about gliders."},
        {"id": "back\\slash'", "content": "Backslash document about gliders."},
    ])
    await store.ingest("other", "docs", [{"id": "theirs", "content": "Their gliders."}])
    hits = await store.search("acme", "docs", "gliders", top_k=10,
                              filters={"document_id": "' OR ''='"})
    assert hits == []
    hits = await store.search("acme", "docs", "gliders", top_k=10, filters={"document_id": evil})
    assert doc_ids(hits) == [evil]
    await store.delete_document("acme", "docs", evil)
    remaining = sorted(doc["id"] for doc in await store.list_documents("acme", "docs"))
    assert remaining == ["back\\slash'", "plain"]
    await store.delete_document("acme", "docs", "back\\slash'")
    assert [d["id"] for d in await store.list_documents("acme", "docs")] == ["plain"]
    assert [d["id"] for d in await store.list_documents("other", "docs")] == ["theirs"]
    assert (await error_of(store.search("acme' OR '1'='1", "docs", "x"))).status == 400


# ---------------------------------------------------------------------------- filters
async def test_metadata_filters(store):
    await seed(store)
    query = "lift heat cake"
    assert sorted(doc_ids(await store.search("acme", "docs", query, top_k=10,
                                             filters={"lang": "en"}))) == ["heat", "wings", "wings"]
    assert set(doc_ids(await store.search("acme", "docs", query, top_k=10,
                                          filters={"lang": ["fr", "de"]}))) == {"cake"}
    assert set(doc_ids(await store.search("acme", "docs", query, top_k=10,
                                          filters={"year": 1960.0, "lang": "en"}))) == {"wings"}
    assert set(doc_ids(await store.search("acme", "docs", query, top_k=10,
                                          filters={"tags": "lift"}))) == {"wings"}
    assert await store.search("acme", "docs", query, top_k=10, filters={"year": "1960"}) == []
    hits = await store.search("acme", "docs", query, top_k=10, mode="bm25",
                              filters={"document_id": ["heat", "cake"]})
    assert set(doc_ids(hits)) == {"heat", "cake"}


# ---------------------------------------------------------------------------- bad input
async def test_bad_input_errors_and_nothing_is_written(store):
    await seed(store)
    cases = [
        ([{"id": "ok", "content": "fine"}, {"id": "empty", "content": "  \n"}],
         400, "empty_document"),
        ([{"id": "h", "content": "<p/>", "content_type": "text/html"}],
         415, "unsupported_media_type"),
        ([{"id": "big", "content": "x" * 200}], 413, "document_too_large"),
        ([{"id": "d", "content": "a"}, {"id": "d", "content": "b"}], 400, "duplicate_document"),
        ([{"id": "n"}], 422, "invalid_value"),
        ([{"id": "m", "content": "a", "metadata": {"k": "v" * 300}}], 400, "invalid_metadata"),
        ([{"id": str(i), "content": "a"} for i in range(5)], 413, "too_many_documents"),
        ([], 400, "invalid_request"),
    ]
    small = await DocumentStore.open(str(store.db.uri), RagSettings(
        max_document_bytes=100, max_documents_per_request=4, max_metadata_bytes=200),
        store._embed)
    for documents, status, code in cases:
        error = await error_of(small.ingest("acme", "docs", documents))
        assert (error.status, error.code) == (status, code), documents
    assert sorted(d["id"] for d in await store.list_documents("acme", "docs")) == [
        "cake", "heat", "wings"]
    error = await error_of(store.ingest("acme", "bad/name", [{"id": "a", "content": "a"}]))
    assert error.status == 400


async def test_search_errors(store):
    await seed(store)
    assert (await error_of(store.search("acme", "nope", "wing"))).status == 404
    assert (await error_of(store.list_documents("acme", "nope"))).status == 404
    assert (await error_of(store.delete_document("acme", "nope", "x"))).status == 404
    assert (await error_of(store.search("acme", "docs", "   "))).status == 400
    assert (await error_of(store.search("acme", "docs", "x" * 5000))).status == 400
    assert (await error_of(store.search("acme", "docs", "wing", top_k=0))).status == 422
    assert (await error_of(store.search("acme", "docs", "wing", top_k=1000))).param == "top_k"
    assert (await error_of(store.search("acme", "docs", "wing", mode="sparse"))).status == 422
    assert (await error_of(store.search("acme", "docs", "wing", filters={"k": []}))).status == 422


# ---------------------------------------------------------------------------- upkeep
async def test_maintenance_compacts_and_builds_an_ann_index_that_finds_everything(tmp_path,
                                                                                  embed):
    settings = RagSettings(vector_index_min_rows=40, vector_partition_rows=16,
                           exact_search_max_rows=0, compact_min_fragments=3,
                           index_update_min_rows=1)
    store = await DocumentStore.open(str(tmp_path / "rag"), settings, embed)
    for batch in range(5):  # five writes -> five fragments
        await store.ingest("acme", "docs", [
            {"id": f"d{batch}-{i}", "content": f"Note {batch}-{i} about topic {i * 7 + batch}."}
            for i in range(10)])
    before = (await store.chunks.stats())["fragment_stats"]["num_fragments"]
    report = await store.maintain()
    after = (await store.chunks.stats())["fragment_stats"]["num_fragments"]
    assert before == 5 and after == 1
    assert report["vector_index"]["built"] == "IVF_FLAT"
    assert store._vector_index == "IVF_FLAT"
    await seed(store)  # new, unindexed rows are searched too
    hits = await store.search("acme", "docs", "why does a wing lose lift past the critical angle",
                              top_k=3, mode="dense")
    assert hits[0]["document_id"] == "wings"
    hits = await store.search("acme", "docs", "Note 3-4 about topic 31", top_k=1, mode="hybrid")
    assert hits[0]["document_id"] == "d3-4"
    reopened = await DocumentStore.open(str(tmp_path / "rag"), settings, embed)
    assert reopened._vector_index == "IVF_FLAT"
    assert (await reopened.maintain())["rag_chunks"]["optimized"] is True  # unindexed rows


async def test_existing_table_with_other_dimension_is_refused(tmp_path, embed):
    await DocumentStore.open(str(tmp_path / "rag"), RagSettings(), embed)
    with pytest.raises(ValueError, match="embedding_dim"):
        await DocumentStore.open(str(tmp_path / "rag"), RagSettings(embedding_dim=8), embed)


async def test_current_versions(store):
    await seed(store)
    await store.ingest("acme", "docs", [{"id": "heat", "content": "v2"}])
    assert await store.current_versions("acme", "docs", ["heat", "wings", "ghost"]) == {
        "heat": 2, "wings": 1}


# ---------------------------------------------------------------------------- deployment shell
class InProcessEmbedder:
    """The LazyHandle interface (`await call(method, *args, timeout_s=...)`) in process."""

    def __init__(self, embed) -> None:
        self.embed = embed

    async def call(self, method: str, texts: list[str], timeout_s: float | None = None):
        assert method == "embed"
        return (await self.embed(texts)).tolist()


async def test_retriever_shell_returns_dicts_and_error_payloads(tmp_path, embed):
    from deployments.retriever import Retriever

    cls = Retriever.func_or_class
    retriever = cls.__new__(cls)
    await retriever.__init__({"data_dir": str(tmp_path), "rag": {"maintenance_interval_s": 3600}},
                             InProcessEmbedder(embed))
    try:
        result = await retriever.ingest("acme", "docs", [{"id": "heat", "content": HEAT}])
        assert result[0]["version"] == 1 and (tmp_path / "rag").is_dir()
        hits = await retriever.search("acme", "docs", "heat conduction", 2)
        assert hits[0]["document_id"] == "heat"
        missing = await retriever.search("acme", "nope", "heat")
        assert missing["__error__"] and missing["status"] == 404
        bad = await retriever.ingest("acme", "docs", [{"id": "x", "content": ""}])
        assert bad["status"] == 400 and bad["code"] == "empty_document"
        assert (await retriever.delete_document("acme", "docs", "heat"))["source_ids"] == [
            "doc:acme/docs/heat@1"]
        assert [c["name"] for c in await retriever.list_collections("acme")] == ["docs"]
    finally:
        retriever._maintenance.cancel()
