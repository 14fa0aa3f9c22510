"""The chat pipeline embeds the last user message once (in the cache stage); routing and
retrieval reuse that vector only when they work on the same text."""
from __future__ import annotations

from serve_app.cache.policy import CacheDecision
from serve_app.gateway.cache_stage import CacheStep
from serve_app.gateway.chat_service import _reusable_vector


def step_for(query_text: str, vector: list[float] | None = None) -> CacheStep:
    decision = CacheDecision(lookup=True, store=True, reason=None, query_text=query_text,
                             prompt_hash="h", scope_key="s", namespace="default",
                             model="auto", semantic=True)
    return CacheStep(decision=decision, vector=vector)


def test_same_text_reuses_the_cache_vector() -> None:
    step = step_for("what is flutter", [0.6, 0.8])
    assert _reusable_vector(step, "what is flutter") == [0.6, 0.8]


def test_whitespace_differences_still_reuse_it() -> None:
    # The cache embeds the message with whitespace runs collapsed (multi-line prompts).
    step = step_for("what is flutter of a wing", [0.6, 0.8])
    assert _reusable_vector(step, "what is\n  flutter of a wing ") == [0.6, 0.8]


def test_other_text_or_no_vector_means_embed_again() -> None:
    assert _reusable_vector(step_for("what is flutter", [0.6, 0.8]), "what is drag") is None
    assert _reusable_vector(step_for("what is flutter"), "what is flutter") is None
    assert _reusable_vector(None, "what is flutter") is None
