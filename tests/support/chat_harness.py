"""A ChatService over fake ports (no Ray, no HTTP): accounting that records admissions and
settlements, a scripted local target, and a provider target whose calls are recorded."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from serve_app.gateway.builder import ChatPorts, build_chat_service
from serve_app.gateway.chat_service import ChatService
from serve_app.errors import ApiError
from serve_app.gateway.request_context import RequestContext, new_request_id
from serve_app.routing.chains import TargetCalls
from serve_app.routing.config import RouterSettings
from serve_app.settings import StackAppSettings

LOCAL = "local-model"


class FakeAccounting:
    def __init__(self, settle_delay_s: float = 0.0) -> None:
        self.admitted: list[dict[str, Any]] = []
        self.extended: list[tuple[str, int, float]] = []
        self.rows: list[dict[str, Any]] = []
        self.settle_delay_s = settle_delay_s

    async def admit(self, **kwargs: Any) -> dict[str, Any]:
        self.admitted.append(kwargs)
        return {"principal": {"tenant_id": "t", "key_id": "k", "route_overrides": {},
                              "cache_sampled": False, "allowed_models": None},
                "reservation": {"id": kwargs["request_id"]}}

    async def extend(self, request_id: str, key_id: str, tokens: int,
                     cost_usd: float) -> None:
        self.extended.append((request_id, tokens, cost_usd))

    async def settle(self, row: dict[str, Any]) -> None:
        if self.settle_delay_s:
            await asyncio.sleep(self.settle_delay_s)
        self.rows.append(row)


class ScriptedLocal:
    """complete/stream of the local target; `fail` raises inside the call."""

    def __init__(self, words: int = 5, delay_s: float = 0.0) -> None:
        self.words = words
        self.delay_s = delay_s
        self.request_ids: list[str] = []
        self.fail: BaseException | None = None

    async def complete(self, request: dict[str, Any], request_id: str) -> dict[str, Any]:
        self.request_ids.append(request_id)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return {"id": "c", "object": "chat.completion", "model": LOCAL,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": self.words,
                          "total_tokens": 7 + self.words}}

    async def stream(self, request: dict[str, Any], request_id: str
                     ) -> AsyncIterator[dict[str, Any]]:
        self.request_ids.append(request_id)
        yield {"id": "c", "object": "chat.completion.chunk", "model": LOCAL,
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None}]}
        for i in range(self.words):
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            yield {"id": "c", "object": "chat.completion.chunk", "model": LOCAL,
                   "choices": [{"index": 0, "delta": {"content": f"w{i} "},
                                "finish_reason": "stop" if i == self.words - 1 else None}]}
        yield {"id": "c", "object": "chat.completion.chunk", "model": LOCAL, "choices": [],
               "usage": {"prompt_tokens": 7, "completion_tokens": self.words,
                         "total_tokens": 7 + self.words}}


class RecordingProvider:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def calls(self, name: str) -> TargetCalls:
        async def complete(request: dict[str, Any], request_id: str) -> dict[str, Any]:
            self.requests.append(request)
            return {"id": "p", "object": "chat.completion", "model": name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}

        async def stream(request: dict[str, Any], request_id: str):
            self.requests.append(request)
            yield ApiError(503, "no streams here", code="service_unavailable").to_payload()

        return TargetCalls(complete, stream)


async def _classify(text: str, vector: list[float], thresholds: Any,
                    tenant: str | None = None) -> dict[str, Any]:
    return {"tier": "small", "score": 0.1}


async def _embed(texts: list[str]) -> list[list[float]]:
    return [[1.0, 0.0] for _ in texts]


def make_service(*, router_settings: RouterSettings | None = None,
                 environ: dict[str, str] | None = None, local: ScriptedLocal | None = None,
                 provider: RecordingProvider | None = None,
                 accounting: FakeAccounting | None = None) -> tuple[
                     ChatService, FakeAccounting, ScriptedLocal, RecordingProvider]:
    """The pipeline as the Gateway builds it (build_chat_service), over in-memory ports."""
    accounting = accounting or FakeAccounting()
    local = local or ScriptedLocal()
    provider = provider or RecordingProvider()
    settings = StackAppSettings.model_validate({
        "router": (router_settings or RouterSettings()).model_dump(),
        "cache": {"enabled": False}, "gateway": {"default_max_tokens": 32}})
    ports = ChatPorts(local=TargetCalls(local.complete, local.stream), remote=provider.calls,
                      classify=_classify, embed=_embed, accounting=accounting,
                      environ=environ or {})
    service = build_chat_service(settings, ports, local_model=LOCAL,
                                 local_default_max_tokens=64)
    return service, accounting, local, provider


def context() -> RequestContext:
    return RequestContext(request_id=new_request_id(), route="/v1/chat/completions",
                          method="POST", client_request_id="client-chosen")
