"""Retrieval quality on Cranfield and search latency of the DocumentStore, in process.

    python -m benchmarks.rag_cranfield [--data-dir ../shared/data] [--synthetic-chunks 100000]

Quality: nDCG@10 (graded gains 1-4 from qrels.tsv, linear gain, log2 discount) and
Recall@100 (gain > 0 is relevant) for bm25, dense and hybrid, with the real embedder
(all-MiniLM-L6-v2). Documents are ranked by their best chunk (chunks of one document after
its first are dropped): nDCG@10 reads the first 10 documents of a top_k=30 chunk search,
Recall@100 the first 100 of a top_k=300 search (candidate pools grow to top_k).

Fusion is reported untuned (the RagSettings defaults) on all queries. A tuning sweep of
rrf_k and the two candidate pools runs on the even-positioned queries only, and the best
setting is scored on the odd-positioned ones next to the defaults on those same queries;
the sweep re-fuses the stored dense and BM25 lists with the store's own fusion function.

Latency: DocumentStore.search wall time at Cranfield size and in a table of
--synthetic-chunks synthetic chunks, per mode: `retrieval_ms` with the query vector given
(the gateway already embeds the prompt for the cache and can pass that vector) and
`with_query_embedding_ms` where the store embeds the query in process (the real model on
CPU). Synthetic chunks: texts sampled
from Cranfield's word frequencies (about 40-120 words each), vectors drawn around 1,000
random unit centres (clustered like real embeddings, so the ANN index behaves as on real
data; uniform random vectors would make every ANN recall look poor). The Cranfield
collection is ingested into that big table too, to time a small collection in a large
shared table. An IVF_FLAT nprobes sweep reports recall@10 of the dense path against exact
search on the synthetic collection. Writes benchmarks/results/rag_cranfield.json.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import median, percentile, write_result
from serve_app.rag.config import RagSettings
from serve_app.rag.fusion import reciprocal_rank_fusion
from serve_app.rag.store import DocumentStore

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODES = ("bm25", "dense", "hybrid")
TENANT = "bench"
NDCG_CHUNKS, RECALL_CHUNKS = 30, 300


# ---------------------------------------------------------------------------- data
def load_cranfield(data_dir: Path) -> tuple[list[dict], list[dict], dict[str, dict[str, int]]]:
    root = data_dir / "rag" / "cranfield"
    corpus = [json.loads(line) for line in (root / "corpus.jsonl").open()]
    corpus = [doc for doc in corpus if doc["text"].strip()]  # two Cranfield records are empty
    queries = [json.loads(line) for line in (root / "queries.jsonl").open()]
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with (root / "qrels.tsv").open() as handle:
        next(handle)
        for line in handle:
            query_id, doc_id, _code, gain = line.rstrip("\n").split("\t")
            if int(gain) > 0:
                qrels[query_id][doc_id] = int(gain)
    queries = [query for query in queries if query["_id"] in qrels]
    return corpus, queries, dict(qrels)


# ---------------------------------------------------------------------------- metrics
def dedupe_documents(hits: list[dict[str, Any]], n: int) -> list[str]:
    docs: list[str] = []
    for hit in hits:
        if hit["document_id"] not in docs:
            docs.append(hit["document_id"])
            if len(docs) == n:
                break
    return docs


def ndcg_at(ranked: list[str], gains: dict[str, int], k: int = 10) -> float:
    dcg = sum(gains.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:k]))
    ideal = sorted(gains.values(), reverse=True)[:k]
    idcg = sum(gain / math.log2(rank + 2) for rank, gain in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at(ranked: list[str], gains: dict[str, int], k: int = 100) -> float:
    return len(set(ranked[:k]) & set(gains)) / len(gains)


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(median(values), 2), "p99_ms": round(percentile(values, 99), 2),
            "mean_ms": round(float(np.mean(values)), 2), "n": len(values)}


# ---------------------------------------------------------------------------- embedding
class Embedding:
    """Real embeddings (cached by text, timed); synthetic clustered vectors on demand."""

    def __init__(self, dim: int = 384, centres: int = 1000, seed: int = 0) -> None:
        from serve_app.embedding import TextEmbedder

        self.model = TextEmbedder()
        self.cache: dict[str, np.ndarray] = {}
        self.synthetic = False
        self.use_cache = True  # off while timing searches: a query is embedded every time
        self.timings_ms: list[float] = []
        rng = np.random.default_rng(seed)
        self.centres = _unit(rng.normal(size=(centres, dim)).astype(np.float32))

    async def __call__(self, texts: list[str]) -> np.ndarray:
        if self.synthetic:
            return np.stack([self.synthetic_vector(text) for text in texts])
        if not self.use_cache:
            return await asyncio.to_thread(self.model.embed, texts)
        missing = [text for text in dict.fromkeys(texts) if text not in self.cache]
        if missing:
            started = time.perf_counter()
            vectors = await asyncio.to_thread(self.model.embed, missing)
            self.timings_ms.append((time.perf_counter() - started) * 1000)
            self.cache.update(zip(missing, vectors))
        return np.stack([self.cache[text] for text in texts])

    def load(self, path: Path) -> int:
        if path.exists():
            with np.load(path, allow_pickle=False) as data:
                self.cache.update(zip(data["texts"].tolist(), data["vectors"]))
        return len(self.cache)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        texts = list(self.cache)
        np.savez(path, texts=np.array(texts), vectors=np.stack([self.cache[t] for t in texts]))

    def synthetic_vector(self, text: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
        rng = np.random.default_rng(seed)
        centre = self.centres[rng.integers(len(self.centres))]
        return _unit(centre + rng.normal(size=centre.shape).astype(np.float32) * 0.05)

    def timed_query_ms(self, text: str) -> float:
        started = time.perf_counter()
        self.model.embed([text])
        return (time.perf_counter() - started) * 1000


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------- quality
async def ingest_cranfield(store: DocumentStore, corpus: list[dict], collection: str,
                           batch: int = 64) -> dict[str, Any]:
    started = time.perf_counter()
    chunks = 0
    for start in range(0, len(corpus), batch):
        docs = [{"id": doc["_id"], "title": doc["title"], "content": doc["text"]}
                for doc in corpus[start:start + batch]]
        chunks += sum(item["chunks"] for item in await store.ingest(TENANT, collection, docs))
    elapsed = time.perf_counter() - started
    await store.maintain(force=True)
    return {"documents": len(corpus), "chunks": chunks, "ingest_s": round(elapsed, 1),
            "chunks_per_s": round(chunks / elapsed, 1)}


async def quality(store: DocumentStore, queries: list[dict], qrels: dict[str, dict[str, int]],
                  collection: str) -> dict[str, Any]:
    settings = store.settings
    lists: dict[str, dict[str, list[dict]]] = {"dense": {}, "bm25": {}}
    per_query: dict[str, dict[str, dict[str, float]]] = {mode: {} for mode in MODES}
    agree = 0
    for query in queries:
        qid, text, gains = query["_id"], query["text"], qrels[query["_id"]]
        for mode in ("dense", "bm25"):
            hits = await store.search(TENANT, collection, text, top_k=RECALL_CHUNKS, mode=mode)
            lists[mode][qid] = hits
            per_query[mode][qid] = {
                "ndcg@10": ndcg_at(dedupe_documents(hits[:NDCG_CHUNKS], 10), gains),
                "recall@100": recall_at(dedupe_documents(hits, 100), gains)}
        short = await store.search(TENANT, collection, text, top_k=NDCG_CHUNKS, mode="hybrid")
        long = await store.search(TENANT, collection, text, top_k=RECALL_CHUNKS, mode="hybrid")
        per_query["hybrid"][qid] = {
            "ndcg@10": ndcg_at(dedupe_documents(short, 10), gains),
            "recall@100": recall_at(dedupe_documents(long, 100), gains)}
        offline = fuse(lists, qid, settings.rrf_k, settings.dense_candidates,
                       settings.bm25_candidates, NDCG_CHUNKS)
        agree += offline == [hit["chunk_id"] for hit in short]
    ids = [query["_id"] for query in queries]
    tune_ids, test_ids = ids[0::2], ids[1::2]
    sweep = tuning_sweep(lists, qrels, tune_ids)
    best = sweep[0]
    return {
        "queries": len(ids),
        "untuned_defaults": {
            "settings": {"rrf_k": settings.rrf_k, "dense_candidates": settings.dense_candidates,
                         "bm25_candidates": settings.bm25_candidates},
            "all_queries": {mode: mean_metrics(per_query[mode], ids) for mode in MODES},
            "test_half": {mode: mean_metrics(per_query[mode], test_ids) for mode in MODES},
        },
        "tuned_on_even_half": {
            "best_on_tuning_half": best,
            "test_half_ndcg@10": round(float(np.mean([
                fused_ndcg(lists, qrels, qid, best["rrf_k"], best["dense_candidates"],
                           best["bm25_candidates"]) for qid in test_ids])), 4),
            "grid_top5_on_tuning_half": sweep[:5],
            "tuning_queries": len(tune_ids), "test_queries": len(test_ids),
        },
        "offline_fusion_matches_store": f"{agree}/{len(ids)}",
    }


def fuse(lists: dict[str, dict[str, list[dict]]], qid: str, k: float, dense_n: int,
         bm25_n: int, top_k: int) -> list[str]:
    dense_n, bm25_n = max(dense_n, top_k), max(bm25_n, top_k)
    fused = reciprocal_rank_fusion([[hit["chunk_id"] for hit in lists["dense"][qid][:dense_n]],
                                    [hit["chunk_id"] for hit in lists["bm25"][qid][:bm25_n]]], k=k)
    return [item.key for item in fused[:top_k]]


def fused_ndcg(lists: dict, qrels: dict[str, dict[str, int]], qid: str, k: float,
               dense_n: int, bm25_n: int) -> float:
    chunk_ids = fuse(lists, qid, k, dense_n, bm25_n, NDCG_CHUNKS)
    hits = [{"document_id": chunk.rsplit("@", 1)[0]} for chunk in chunk_ids]
    return ndcg_at(dedupe_documents(hits, 10), qrels[qid])


def tuning_sweep(lists: dict, qrels: dict[str, dict[str, int]], ids: list[str]) -> list[dict]:
    rows = []
    for k in (1, 5, 10, 20, 40, 60, 100):
        for dense_n in (10, 20, 50, 100):
            for bm25_n in (10, 20, 50, 100):
                score = float(np.mean([fused_ndcg(lists, qrels, qid, k, dense_n, bm25_n)
                                       for qid in ids]))
                rows.append({"rrf_k": k, "dense_candidates": dense_n,
                             "bm25_candidates": bm25_n, "ndcg@10": round(score, 4)})
    rows.sort(key=lambda row: -row["ndcg@10"])
    return rows


def mean_metrics(per_query: dict[str, dict[str, float]], ids: list[str]) -> dict[str, float]:
    return {metric: round(float(np.mean([per_query[qid][metric] for qid in ids])), 4)
            for metric in ("ndcg@10", "recall@100")}


# ---------------------------------------------------------------------------- latency
async def latency(store: DocumentStore, queries: list[str], vectors: np.ndarray,
                  collection: str, n: int, top_k: int = 10) -> dict[str, Any]:
    """Per mode: `retrieval_ms` with the query vector given (as when the gateway passes the
    prompt embedding it computed for the cache) and, for dense and hybrid,
    `with_query_embedding_ms` where the store embeds the query itself (in process)."""
    embed = store._embed
    out: dict[str, Any] = {}
    for mode in MODES:
        for index in range(5):  # warm caches and index readers
            await store.search(TENANT, collection, queries[index], top_k=top_k, mode=mode,
                               query_vector=vectors[index])
        entry: dict[str, Any] = {}
        variants = [("retrieval_ms", True)] + ([] if mode == "bm25" else
                                               [("with_query_embedding_ms", False)])
        for name, given in variants:
            if isinstance(embed, Embedding):
                embed.use_cache = False
            times = []
            for index in range(n):
                qi = index % len(queries)
                started = time.perf_counter()
                await store.search(TENANT, collection, queries[qi], top_k=top_k, mode=mode,
                                   query_vector=vectors[qi] if given else None)
                times.append((time.perf_counter() - started) * 1000)
            if isinstance(embed, Embedding):
                embed.use_cache = True
            entry[name] = summary(times)
        out[mode] = entry
    return out


def synthetic_documents(corpus: list[dict], n: int, seed: int = 1) -> list[dict[str, str]]:
    words = [word for doc in corpus for word in doc["text"].split()]
    vocab, counts = np.unique(np.array(words), return_counts=True)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(40, 121, size=n)
    drawn = rng.choice(len(vocab), size=int(lengths.sum()), p=counts / counts.sum())
    docs, offset = [], 0
    for index, length in enumerate(lengths):
        text = " ".join(vocab[drawn[offset:offset + length]])
        docs.append({"id": f"syn-{index}", "content": text})
        offset += length
    return docs


async def synthetic_run(workdir: Path, embedding: Embedding, corpus: list[dict],
                        queries: list[str], vectors: np.ndarray, n_chunks: int,
                        n_latency: int) -> dict[str, Any]:
    settings = RagSettings(max_documents_per_request=1000, max_top_k=RECALL_CHUNKS)
    store = await DocumentStore.open(str(workdir / "synthetic"), settings, embedding)
    docs = synthetic_documents(corpus, n_chunks)
    embedding.synthetic = True
    started = time.perf_counter()
    for start in range(0, len(docs), 1000):
        await store.ingest(TENANT, "synthetic", docs[start:start + 1000])
    ingest_s = time.perf_counter() - started
    embedding.synthetic = False
    fragments = (await store.chunks.stats())["fragment_stats"]["num_fragments"]
    started = time.perf_counter()
    report = await store.maintain()
    maintain_s = time.perf_counter() - started
    await ingest_cranfield(store, corpus, "cranfield")  # cached vectors: no re-embedding
    await store.maintain(force=True)
    rows = await store.chunks.count_rows()

    result: dict[str, Any] = {
        "table_rows": rows,
        "synthetic_chunks": await store.chunks.count_rows("collection = 'synthetic'"),
        "ingest_s": round(ingest_s, 1), "fragments_before_maintenance": fragments,
        "maintenance_s": round(maintain_s, 1), "vector_index": report.get("vector_index"),
        "latency_synthetic_collection_ann": await latency(store, queries, vectors, "synthetic",
                                                          n_latency),
        "latency_cranfield_collection_in_shared_table": await latency(
            store, queries, vectors, "cranfield", n_latency),
        "ann_sweep": await ann_sweep(workdir / "synthetic", settings, embedding, queries),
    }
    return result


async def ann_sweep(uri: Path, settings: RagSettings, embedding: Embedding,
                    queries: list[str]) -> dict[str, Any]:
    """Dense top-10 on the synthetic collection: IVF_FLAT at several nprobes against exact
    search, with query vectors drawn like the documents' (clustered)."""
    vectors = np.stack([embedding.synthetic_vector(f"query {text}") for text in queries[:100]])

    async def run_with(update: dict[str, Any]) -> tuple[list[list[str]], list[float]]:
        store = await DocumentStore.open(str(uri), settings.model_copy(update=update), embedding)
        ids, times = [], []
        for text, vector in zip(queries, vectors):
            started = time.perf_counter()
            hits = await store.search(TENANT, "synthetic", text, top_k=10, mode="dense",
                                      query_vector=vector)
            times.append((time.perf_counter() - started) * 1000)
            ids.append([hit["chunk_id"] for hit in hits])
        return ids, times

    exact_ids, exact_times = await run_with({"exact_search_max_rows": 10**9})
    out: dict[str, Any] = {"exact": {"retrieval_ms": summary(exact_times)}}
    for nprobes in (10, 20, 40):
        ids, times = await run_with({"vector_nprobes": nprobes})
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)])
        out[f"ivf_flat_nprobes_{nprobes}"] = {"recall@10_vs_exact": round(float(recall), 3),
                                              "retrieval_ms": summary(times)}
    return out


# ---------------------------------------------------------------------------- main
async def run(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = Path(args.data_dir)
    if not data_dir.is_absolute():
        data_dir = (PROJECT_ROOT / data_dir).resolve()
    corpus, queries, qrels = load_cranfield(data_dir)
    if args.smoke:  # a quick end-to-end check of this script; numbers mean nothing
        corpus, queries = corpus[:150], queries[:12]
    embedding = Embedding()
    cache_path = Path(args.embedding_cache) if args.embedding_cache else None
    cached = embedding.load(cache_path) if cache_path else 0
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="rag-bench-", dir=args.work_dir))
    try:
        settings = RagSettings(max_top_k=RECALL_CHUNKS)
        store = await DocumentStore.open(str(workdir / "cranfield"), settings, embedding)
        ingest = await ingest_cranfield(store, corpus, "cranfield")
        ingest["embeddings_from_cache_file"] = cached
        ingest["timing_includes_embedding"] = cached == 0
        if cache_path:
            embedding.save(cache_path)
        embed_ms = list(embedding.timings_ms)
        result: dict[str, Any] = {"settings": settings.model_dump(
            include={"chunk_tokens", "chunk_overlap_tokens", "rrf_k", "dense_candidates",
                     "bm25_candidates", "exact_search_max_rows", "vector_index_type",
                     "vector_nprobes", "vector_partition_rows"}),
            "ingest": ingest}
        result["quality"] = await quality(store, queries, qrels, "cranfield")
        query_texts = [query["text"] for query in queries]
        query_vectors = embedding.model.embed(query_texts)
        result["latency_cranfield"] = {
            "table_rows": await store.chunks.count_rows(),
            **await latency(store, query_texts, query_vectors, "cranfield",
                            args.latency_queries)}
        result["query_embedding_ms"] = summary(
            [embedding.timed_query_ms(text) for text in query_texts[:100]])
        result["ingest"]["embedding_batches_ms"] = summary(embed_ms)
        if args.synthetic_chunks:
            result["synthetic"] = await synthetic_run(workdir, embedding, corpus, query_texts,
                                                      query_vectors, args.synthetic_chunks,
                                                      args.latency_queries)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["load_average"] = {"before": [round(x, 1) for x in load_before],
                              "after": [round(x, 1) for x in os.getloadavg()]}
    result["notes"] = (
        "In-process DocumentStore.search latency (query embedding on CPU included for dense "
        "and hybrid); the HTTP API path adds the gateway and handle hops. Documents are "
        "ranked by their best chunk. Tuning used only the even-positioned queries.")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--work-dir", default=None, help="Where the temporary tables go.")
    parser.add_argument("--synthetic-chunks", type=int, default=100_000,
                        help="Size of the synthetic table (0 skips it).")
    parser.add_argument("--latency-queries", type=int, default=225)
    parser.add_argument("--result-name", default="rag_cranfield")
    parser.add_argument("--embedding-cache", default=None,
                        help="npz of chunk embeddings reused across runs (ingest timing is "
                        "then not an embedding measurement).")
    parser.add_argument("--smoke", action="store_true",
                        help="150 documents and 12 queries: checks the script, not the system.")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    path = write_result(args.result_name, result)
    print(json.dumps({key: result[key] for key in ("quality", "latency_cranfield")}, indent=2))
    if "synthetic" in result:
        print(json.dumps(result["synthetic"], indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
