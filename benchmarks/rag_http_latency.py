"""Retrieval latency through the HTTP API (POST /v1/retrieve: Gateway -> Retriever ->
Embedder -> LanceDB hybrid search) at the Cranfield size and at 100k synthetic chunks,
beside the latency of an LLM call (local model, 32 tokens) in the same run, and the
retrieval stage of RAG chat requests (`rag: {collection}`) as the gateway logs it.

The tables are filled in-process first (Cranfield with real embeddings; 100k synthetic
chunks with synthetic vectors, as embedding 100k texts on this CPU would take hours), then
the stack opens them. Queries are Cranfield's, embedded by the Embedder on every request.

    python -m benchmarks.rag_http_latency [--synthetic-chunks 100000] [--queries 100]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import median, percentile, start_stack, write_result
from benchmarks.rag_cranfield import (
    TENANT,
    Embedding,
    ingest_cranfield,
    load_cranfield,
    synthetic_documents,
)
from serve_app.rag.config import RagSettings
from serve_app.rag.store import DocumentStore
from serve_app.settings import PROJECT_ROOT

MODEL = "smollm2-135m-instruct"


async def fill_tables(uri: str, corpus: list[dict], n_synthetic: int,
                      cache_file: Path | None) -> dict:
    embedding = Embedding()
    if cache_file is not None:
        embedding.load(cache_file)
    settings = RagSettings(max_documents_per_request=1000)
    store = await DocumentStore.open(uri, settings, embedding)
    started = time.perf_counter()
    cranfield = await ingest_cranfield(store, corpus, "cranfield")
    embedding.synthetic = True
    docs = synthetic_documents(corpus, n_synthetic)
    for start in range(0, len(docs), 1000):
        await store.ingest(TENANT, "synthetic", docs[start:start + 1000])
    embedding.synthetic = False
    await store.maintain(force=True)
    return {"cranfield": cranfield, "synthetic_chunks": n_synthetic,
            "fill_s": round(time.perf_counter() - started, 1),
            "table_rows": await store.chunks.count_rows()}


def stage_latencies(data_dir: Path, request_ids: list[str], stage: str) -> list[float]:
    wanted = set(request_ids)
    values = []
    for line in (data_dir / "logs" / "requests.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("request_id") in wanted and stage in record.get("stages_ms", {}):
            values.append(float(record["stages_ms"][stage]))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=PROJECT_ROOT.parent / "shared" / "data")
    parser.add_argument("--synthetic-chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--embedding-cache", type=Path, default=None,
                        help=".npz of Cranfield chunk vectors (benchmarks.rag_cranfield)")
    args = parser.parse_args()
    corpus, queries, _ = load_cranfield(args.data_dir)
    data_dir = Path(tempfile.mkdtemp(prefix="bench-rag-"))
    filled = asyncio.run(fill_tables(str(data_dir / "rag"), corpus, args.synthetic_chunks,
                                     args.embedding_cache))
    # The cache stays on (the default): RAG chat reuses its query embedding. Every text is
    # distinct, so nothing is answered from the cache.
    stack, key = start_stack(data_dir=data_dir, tenant=TENANT)
    texts = [q["text"] for q in queries[:args.queries]]
    samples: dict[str, list[float]] = {"retrieve_cranfield": [], "retrieve_100k": [],
                                       "llm_call": [], "rag_chat": []}
    rag_chat_ids: list[str] = []
    try:
        with httpx.Client(base_url=stack.base_url, timeout=300,
                          headers={"authorization": f"Bearer {key}"}) as http:
            def timed(method: str, path: str, body: dict, ids: list[str] | None = None) -> float:
                started = time.perf_counter()
                response = http.request(method, path, json=body)
                elapsed = (time.perf_counter() - started) * 1000
                response.raise_for_status()
                if ids is not None:
                    ids.append(response.headers["x-request-id"])
                return elapsed

            for name in ("cranfield", "synthetic"):  # warm both collections
                timed("POST", "/v1/retrieve", {"collection": name, "query": "warm up"})
            for index, text in enumerate(texts):
                samples["retrieve_cranfield"].append(timed(
                    "POST", "/v1/retrieve", {"collection": "cranfield", "query": text,
                                             "top_k": 10}))
                samples["retrieve_100k"].append(timed(
                    "POST", "/v1/retrieve", {"collection": "synthetic", "query": text,
                                             "top_k": 10}))
                if index % 4 == 0:  # an LLM call every few queries, same conditions
                    samples["llm_call"].append(timed("POST", "/v1/chat/completions", {
                        "model": MODEL, "max_tokens": 32, "temperature": 0,
                        "messages": [{"role": "user", "content": text}]}))
                    samples["rag_chat"].append(timed("POST", "/v1/chat/completions", {
                        "model": MODEL, "max_tokens": 32, "temperature": 0,
                        "rag": {"collection": "cranfield", "top_k": 3},
                        "messages": [{"role": "user", "content": text}]}, rag_chat_ids))
    finally:
        stack.shutdown()
    # The retrieval stage inside those chat requests, from the gateway's request log.
    samples["rag_chat_retrieve_stage"] = stage_latencies(data_dir, rag_chat_ids, "retrieve")
    summary = {name: {"n": len(v), "p50_ms": median(v), "p99_ms": percentile(v, 99)}
               for name, v in samples.items()}
    llm = summary["llm_call"]["p50_ms"]
    ratios = {f"{name}_p50_over_llm_p50": summary[name]["p50_ms"] / llm
              for name in ("retrieve_cranfield", "retrieve_100k", "rag_chat_retrieve_stage")}
    path = write_result("rag_http_latency", {
        "config": {"queries": len(texts), "top_k": 10, "mode": "hybrid",
                   "llm_call": f"{MODEL}, max_tokens 32"},
        "tables": filled, "summary": summary, "ratios": ratios})
    print(json.dumps({"summary": summary, "ratios": ratios}, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
