"""CacheStore on a real LanceDB table in tmp_path, with random unit vectors."""
import threading

import numpy as np
import pytest

from serve_app.cache.guard import PairGuard
from serve_app.cache.store import NEVER, CacheEntry, CacheStore

DIM = 384
NOW = 1_700_000_000.0


def unit(rng: np.random.Generator) -> np.ndarray:
    vector = rng.normal(size=DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def near(vector: np.ndarray, similarity: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector with the given cosine to `vector`."""
    noise = rng.normal(size=DIM).astype(np.float32)
    noise -= noise.dot(vector) * vector
    noise /= np.linalg.norm(noise)
    return similarity * vector + np.sqrt(1 - similarity**2) * noise


def entry(vector, *, tenant="acme", scope="s1", prompt="What is the capital of France?",
          prompt_hash=None, created_at=NOW, expires_at=NEVER, **extra) -> CacheEntry:
    return CacheEntry(tenant=tenant, scope_key=scope, prompt=prompt,
                      prompt_hash=prompt_hash or f"h-{prompt}", vector=vector,
                      answer='{"choices": []}', model=extra.pop("model", "small"),
                      created_at=created_at, expires_at=expires_at, **extra)


def lookup(store, vector, *, tenant="acme", scope="s1", prompt_hash="nope", threshold=0.9,
           now=NOW + 1, **kwargs):
    return store.lookup(tenant=tenant, scope_key=scope, prompt_hash=prompt_hash,
                        vector=vector, threshold=threshold, now=now, **kwargs)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.fixture(params=[True, False], ids=["memory_index", "lancedb_queries"])
def store(tmp_path, request):
    """Every behaviour holds with lookups from the in-memory mirror and from LanceDB."""
    return CacheStore(tmp_path / "cache", dim=DIM, batch_size=4, memory_index=request.param)


def test_exact_hash_hits_even_with_another_vector(store, rng):
    store.add([entry(unit(rng), prompt_hash="h1")])
    store.flush()
    outcome = lookup(store, unit(rng), prompt_hash="h1")
    assert outcome.hit is not None and outcome.hit.match == "exact"
    assert outcome.hit.similarity == 1.0


def test_vector_hit_above_threshold_and_miss_below(store, rng):
    cached = unit(rng)
    store.add([entry(cached)])
    store.flush()
    hit = lookup(store, near(cached, 0.95, rng), threshold=0.93)
    assert hit.hit is not None and hit.hit.match == "semantic"
    assert hit.hit.similarity == pytest.approx(0.95, abs=1e-4)
    miss = lookup(store, near(cached, 0.90, rng), threshold=0.93)
    assert miss.hit is None and miss.rejected == "below_threshold"
    assert miss.best_similarity == pytest.approx(0.90, abs=1e-4)


def test_tenants_never_see_each_others_entries(store, rng):
    vector = unit(rng)
    store.add([entry(vector, tenant="acme", prompt_hash="same")])
    store.flush()
    for other in ("globex", "acme ", "x' OR '1'='1", "acme' --"):
        outcome = lookup(store, vector, tenant=other, prompt_hash="same")
        assert outcome.hit is None and outcome.rejected == "empty"
    assert lookup(store, vector, tenant="acme", prompt_hash="same").hit is not None


def test_quotes_in_tenant_ids_are_data_not_sql(store, rng):
    vector = unit(rng)
    store.add([entry(vector, tenant="o'brien")])
    store.flush()
    assert lookup(store, vector, tenant="o'brien").hit is not None
    assert store.invalidate("tenant", "o'brien") == 1


def test_scope_keys_are_isolated(store, rng):
    vector = unit(rng)
    store.add([entry(vector, scope="french-system-prompt")])
    store.flush()
    assert lookup(store, vector, scope="english-system-prompt").hit is None
    assert lookup(store, vector, scope="french-system-prompt").hit is not None


def test_expired_entries_are_never_returned_and_expire_deletes_them(store, rng):
    vector = unit(rng)
    store.add([entry(vector, prompt_hash="h", expires_at=NOW + 10)])
    assert lookup(store, vector, prompt_hash="h", now=NOW + 11).hit is None  # buffered
    store.flush()
    assert lookup(store, vector, prompt_hash="h", now=NOW + 9).hit is not None
    assert lookup(store, vector, prompt_hash="h", now=NOW + 11).hit is None
    assert store.expire(NOW + 11) == 1
    assert store.count() == 0


@pytest.mark.parametrize(("kind", "value", "deleted"), [
    ("tenant", "acme", 3),
    ("model", "large", 1),
    ("model", "auto", 2),  # the model the client asked for counts too
    ("source", "doc:42@3", 2),
    ("namespace", "faq", 1),
    ("all", None, 4),
])
def test_invalidation_by_each_kind(store, rng, kind, value, deleted):
    store.add([
        entry(unit(rng), prompt="a", source_ids=["doc:42@3", "doc:7@1"], requested_model="auto"),
        entry(unit(rng), prompt="b", model="large", source_ids=["doc:42@3"]),
        entry(unit(rng), prompt="c", namespace="faq", requested_model="auto"),
        entry(unit(rng), prompt="d", tenant="globex", source_ids=["doc:42@30"]),
    ])
    store.flush()
    assert store.invalidate(kind, value) == deleted
    assert store.count() == 4 - deleted


def test_invalidation_by_id_and_tenant_narrowing(store, rng):
    keep, drop = entry(unit(rng), prompt="keep"), entry(unit(rng), prompt="drop")
    other = entry(unit(rng), prompt="other", tenant="globex", namespace="faq")
    mine = entry(unit(rng), prompt="mine", namespace="faq")
    store.add([keep, drop, other, mine])
    store.flush()
    assert store.invalidate("id", drop.id) == 1
    assert store.invalidate("namespace", "faq", tenant="acme") == 1
    assert store.count() == 2
    with pytest.raises(ValueError, match="unknown invalidation kind"):
        store.invalidate("colour", "red")
    with pytest.raises(ValueError, match="needs a value"):
        store.invalidate("source", "")


def test_invalidation_also_drops_buffered_entries(store, rng):
    store.add([entry(unit(rng), source_ids=["doc:1@1"])])
    assert store.pending == 1
    assert store.invalidate("source", "doc:1@1") == 1
    assert store.count() == 0


def test_eviction_removes_least_recently_hit_first(store, rng):
    vectors = [unit(rng) for _ in range(5)]
    entries = [entry(v, prompt=f"p{i}", prompt_hash=f"h{i}", created_at=NOW + i)
               for i, v in enumerate(vectors)]
    store.add(entries)
    store.flush()
    store.record_hit(entries[0].id, NOW + 100)
    store.record_hit(entries[1].id, NOW + 50)
    assert store.evict(max_entries=3) == 2
    left = {e.prompt for e in entries
            if lookup(store, None, prompt_hash=e.prompt_hash, now=NOW + 101).hit}
    assert left == {"p0", "p1", "p4"}  # p2 and p3 were the least recently hit
    assert store.evict(max_entries=3) == 0
    assert store.stats()["evicted"] == 2


def test_eviction_can_shrink_below_the_cap(store, rng):
    store.add([entry(unit(rng), prompt=str(i), created_at=NOW + i) for i in range(8)])
    assert store.evict(max_entries=6, target=4) == 4
    assert store.count() == 4


def test_inserts_are_buffered_and_written_in_batches(store, rng):
    vectors = [unit(rng) for _ in range(6)]
    store.add([entry(v, prompt=f"p{i}") for i, v in enumerate(vectors[:3])])
    stats = store.stats()
    assert stats["pending_inserts"] == 3 and stats.get("insert_writes", 0) == 0
    assert lookup(store, vectors[1]).hit.prompt == "p1"  # found while still buffered
    store.add([entry(vectors[3], prompt="p3")])  # the 4th fills the batch
    stats = store.stats()
    assert stats["insert_writes"] == 1 and stats["pending_inserts"] == 0
    store.add([entry(v, prompt=f"p{i}") for i, v in enumerate(vectors[4:], start=4)])
    assert store.flush() == 2
    assert store.stats()["insert_writes"] == 2 and store.count() == 6


def test_hits_are_counted_in_one_write(store, rng):
    vector = unit(rng)
    store.add([entry(vector, prompt_hash="h")])
    store.flush()
    for _ in range(3):
        store.record_hit(lookup(store, vector, prompt_hash="h").hit.entry_id, NOW + 5)
    assert store.stats()["pending_hit_updates"] == 1
    store.flush()
    assert lookup(store, vector, prompt_hash="h").hit.hit_count == 3
    assert store.stats()["hit_writes"] == 1


def test_entries_survive_a_restart(tmp_path, rng):
    vector = unit(rng)
    first = CacheStore(tmp_path / "cache", dim=DIM, batch_size=64)
    first.add([entry(vector, prompt_hash="h", source_ids=["doc:9@2"])])
    first.record_hit(first.lookup(tenant="acme", scope_key="s1", prompt_hash="h",
                                  vector=vector, threshold=0.9, now=NOW).hit.entry_id, NOW)
    first.close()
    reopened = CacheStore(tmp_path / "cache", dim=DIM, batch_size=64)
    outcome = lookup(reopened, vector, prompt_hash="other")
    assert outcome.hit is not None and outcome.hit.source_ids == ("doc:9@2",)
    assert outcome.hit.hit_count == 1


def test_a_table_with_another_layout_is_recreated(tmp_path, rng):
    old = CacheStore(tmp_path / "cache", dim=8)
    old.add([entry(np.ones(8, dtype=np.float32))])
    old.flush()
    new = CacheStore(tmp_path / "cache", dim=DIM)
    assert new.count() == 0
    new.add([entry(unit(rng))])
    assert new.flush() == 1


def test_concurrent_adds_lose_nothing(tmp_path, rng):
    store = CacheStore(tmp_path / "cache", dim=DIM, batch_size=7)
    vectors = [unit(rng) for _ in range(120)]
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for i in range(offset, 120, 8):
                store.add([entry(vectors[i], prompt=f"p{i}", prompt_hash=f"h{i}")])
                lookup(store, vectors[i])  # lookups interleave with writes
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.flush()
    assert errors == []
    assert store.count() == 120
    for i in (0, 37, 119):
        assert lookup(store, None, prompt_hash=f"h{i}").hit.prompt == f"p{i}"


def test_guard_rejects_a_close_candidate_and_the_next_one_can_hit(store, rng):
    query = unit(rng)
    store.add([
        entry(near(query, 0.99, rng), prompt="Flights from London to Paris"),
        entry(near(query, 0.96, rng), prompt="flights from paris to london please"),
    ])
    store.flush()
    guard = PairGuard().check
    outcome = lookup(store, query, threshold=0.95, query_text="flights from Paris to London",
                     guard=guard)
    assert outcome.hit is not None
    assert outcome.hit.prompt == "flights from paris to london please"
    store.invalidate("all")
    store.add([entry(near(query, 0.99, rng), prompt="Flights from London to Paris")])
    miss = lookup(store, query, threshold=0.95, query_text="flights from Paris to London",
                  guard=guard)
    assert miss.hit is None and miss.rejected == "guard:word_order"


@pytest.mark.parametrize("index_type", ["IVF_HNSW_SQ", "IVF_FLAT"])
def test_index_is_built_once_the_table_is_large_and_lookups_still_work(tmp_path, rng,
                                                                       index_type):
    store = CacheStore(tmp_path / "cache", dim=DIM, batch_size=100, index_threshold=300,
                       index_type=index_type)
    vectors = [unit(rng) for _ in range(300)]
    store.add([entry(v, prompt=f"p{i}", tenant=f"t{i % 3}") for i, v in enumerate(vectors)])
    assert store.optimize()["indexed"] is True
    assert store.vector_index() is not None
    outcome = lookup(store, near(vectors[10], 0.97, rng), tenant="t1", threshold=0.95)
    assert outcome.hit is not None and outcome.hit.prompt == "p10"
    store.add([entry(unit(rng), prompt="late", tenant="t1")])
    store.flush()
    assert store.optimize(force=True)["compacted"] is True


def test_compaction_merges_small_fragments(tmp_path, rng):
    store = CacheStore(tmp_path / "cache", dim=DIM, batch_size=1, compact_after_fragments=4)
    for i in range(5):
        store.add([entry(unit(rng), prompt=f"p{i}")])
    assert store.stats()["fragments"] == 5
    result = store.optimize()
    assert result["compacted"] is True
    assert store.stats()["fragments"] == 1
    assert store.count() == 5


def test_bad_vectors_are_refused(store):
    with pytest.raises(ValueError, match="dimensions"):
        store.add([entry(np.ones(3, dtype=np.float32))])
    with pytest.raises(ValueError, match="non-zero"):
        store.add([entry(np.zeros(DIM, dtype=np.float32))])


def test_the_mirror_is_rebuilt_from_the_table_and_follows_every_deletion(tmp_path, rng):
    """After a restart the mirror holds exactly the table's live rows; invalidation,
    expiry and eviction remove rows from it as from the table."""
    first = CacheStore(tmp_path / "cache", dim=DIM, batch_size=64)
    vectors = [unit(rng) for _ in range(6)]
    for i, vector in enumerate(vectors):
        first.add([entry(vector, prompt=f"question {i}", prompt_hash=f"h{i}",
                         tenant="acme" if i < 4 else "globex")])
    first.close()
    store = CacheStore(tmp_path / "cache", dim=DIM, batch_size=64)
    assert len(store._memory) == 6
    assert lookup(store, vectors[1], prompt_hash="h1").hit.match == "exact"
    assert lookup(store, near(vectors[2], 0.97, rng)).hit.prompt == "question 2"
    assert store.invalidate("tenant", "globex") == 2
    assert len(store._memory) == 4
    assert lookup(store, vectors[4], tenant="globex", prompt_hash="h4").hit is None
    store.evict(max_entries=2)
    assert len(store._memory) == 2 == store.count()
