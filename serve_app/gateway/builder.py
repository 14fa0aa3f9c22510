"""`build_chat_service`: the chat pipeline from validated settings and explicit ports.

A pure function (no Ray, no HTTP, nothing reaches back into the caller): the Gateway calls
it with ports over deployment handles, unit tests with in-memory ports. What the pipeline
needs from the world is all in `ChatPorts`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from serve_app.gateway.cache_stage import CachePort, CacheStage, Embed
from serve_app.gateway.chat_service import Accounting, ChatService, RetrieverPort
from serve_app.llm.token_count import LocalCounter, PromptCounter
from serve_app.quota.pricing import Price
from serve_app.routing.chains import TargetCalls
from serve_app.gateway.router import Classify, GatewayRouter
from serve_app.routing.load import LocalLoad
from serve_app.settings import StackAppSettings


@dataclass
class ChatPorts:
    local: TargetCalls  # the local vLLM target
    remote: Callable[[str], TargetCalls]  # provider name -> its calls
    classify: Classify
    embed: Embed
    accounting: Accounting | None = None
    cache: CachePort | None = None
    retriever: RetrieverPort | None = None
    local_counter: PromptCounter = field(default_factory=LocalCounter)
    local_load: LocalLoad | None = None
    on_tokens: Callable[[str, int, int], None] | None = None
    on_ttft: Callable[[str, float], None] | None = None
    environ: Mapping[str, str] | None = None  # where provider API keys are looked up


def build_chat_service(settings: StackAppSettings, ports: ChatPorts, *,
                       local_model: str, local_default_max_tokens: int = 256) -> ChatService:
    router = GatewayRouter(
        settings.router, local_model=local_model, local=ports.local, remote=ports.remote,
        classify=ports.classify, embed=ports.embed, environ=ports.environ,
        local_default_max_tokens=local_default_max_tokens,
        provider_default_max_tokens=settings.gateway.default_max_tokens,
        local_counter=ports.local_counter,
        local_load=ports.local_load or LocalLoad(settings.router.local.max_running_requests))

    def price_of_answer(model: str) -> Price:
        """Price of the model that produced a cached answer (what a hit saves)."""
        target = router.policy.explicit_targets.get(model)
        return router.price(target) if target else settings.price_of(model)

    cache = CacheStage(ports.cache, settings.cache, ports.embed, price_of_answer,
                       settings.rag.max_sources_header_bytes)
    return ChatService(
        router=router, accounting=ports.accounting if settings.quota.enabled else None,
        cache=cache, retriever=ports.retriever, rag_settings=settings.rag,
        prompt_log_mode=settings.gateway.log_prompts,
        auth_required=settings.quota.auth_required, on_tokens=ports.on_tokens,
        on_ttft=ports.on_ttft)


def local_info_defaults(info: dict[str, Any]) -> dict[str, Any]:
    """What the builder needs from LocalLLM's model_info."""
    return {"local_model": info["id"],
            "local_default_max_tokens": int(info.get("default_max_tokens") or 256)}
