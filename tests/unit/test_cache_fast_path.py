"""The cache's fast path in the gateway pipeline: an exact repeat is answered from the
normalised-prompt hash before the query is embedded; a paraphrase costs one embedding and
one lookup; a miss embeds once (the vector is reused by the store)."""
from __future__ import annotations

import numpy as np

from serve_app.cache.config import CacheSettings
from serve_app.cache.service import CacheService
from serve_app.gateway.cache_stage import CacheStage
from serve_app.quota.pricing import Price
from serve_app.gateway.request_context import RequestContext, new_request_id

DIM = 384
PRINCIPAL = {"tenant_id": "acme", "key_id": "k", "cache_sampled": False}


class InProcessCache:
    """The CachePort over a real CacheService (LanceDB), without Ray."""

    def __init__(self, service: CacheService) -> None:
        self.service = service
        self.lookups: list[bool] = []

    async def lookup(self, tenant, decision, vector, exact_only=False, request_id=None):
        self.lookups.append(exact_only)
        return self.service.lookup(tenant, decision, vector, exact_only, request_id)

    def store(self, tenant, decision, vector, completion, source_ids, tier):
        self.service.store_answer(tenant, decision, vector, completion,
                                  source_ids=source_ids, tier=tier)
        self.service.store.flush()

    def record_saving(self, usd, model):
        pass


class CountingEmbedder:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, texts):
        self.calls += 1
        # Paraphrases of one question land on the same vector here.
        seed = 1 if "capital" in texts[0].lower() else 2
        values = np.random.default_rng(seed).normal(size=DIM)
        return [(values / np.linalg.norm(values)).tolist() for _ in texts]


def ctx() -> RequestContext:
    context = RequestContext(request_id=new_request_id(), route="/v1/chat/completions",
                             method="POST")
    context.tenant = "acme"
    return context


def raw(prompt: str) -> dict:
    return {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": prompt}]}


ANSWER = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                       "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}


async def test_exact_repeat_never_calls_the_embedder(tmp_path) -> None:
    settings = CacheSettings(guard=False)
    port = InProcessCache(CacheService(settings, tmp_path / "cache"))
    embed = CountingEmbedder()
    stage = CacheStage(port, settings, embed, lambda model: Price(), 1000)

    first = ctx()
    step = await stage.lookup(raw("What is the capital of France?"), {}, PRINCIPAL, first)
    assert step.hit is None and embed.calls == 1  # a miss embeds once
    stage.store(step, first, ANSWER, None)

    embed.calls = 0
    port.lookups.clear()
    repeat = ctx()
    again = await stage.lookup(raw("what is the capital of france"), {}, PRINCIPAL, repeat)
    assert again.hit is not None and repeat.cache == "hit"
    assert embed.calls == 0 and port.lookups == [True]  # one hash probe, no embedding

    paraphrase = ctx()
    similar = await stage.lookup(raw("Tell me France's capital city"), {}, PRINCIPAL,
                                 paraphrase)
    assert similar.hit is not None and embed.calls == 1  # one embedding, one full lookup
    assert port.lookups == [True, True, False]


async def test_an_exact_probe_miss_is_not_counted_twice(tmp_path) -> None:
    settings = CacheSettings(guard=False)
    service = CacheService(settings, tmp_path / "cache")
    stage = CacheStage(InProcessCache(service), settings, CountingEmbedder(),
                       lambda model: Price(), 1000)
    await stage.lookup(raw("Something never asked"), {}, PRINCIPAL, ctx())
    assert service.counts["misses"] == 1 and service.counts["hits"] == 0
