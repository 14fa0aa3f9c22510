"""RemoteLLM: OpenAI-compatible providers (openai SDK) with timeouts, retries and one
circuit breaker per provider. Thin shell over serve_app.routing.remote.RemoteProviders.

Convention (as LocalLLM): `chat` returns a completion dict or an error payload;
`chat_stream` yields chunk dicts and, on failure, one final error payload."""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from serve_app.routing.config import RouterSettings
from serve_app.routing.remote import RemoteProviders

logger = logging.getLogger("ray.serve")


@serve.deployment(name="RemoteLLM", max_ongoing_requests=512)
class RemoteLLM:
    def __init__(self, settings: dict[str, Any]) -> None:
        router = RouterSettings.model_validate(settings.get("router", {}))
        self.providers = RemoteProviders(router)
        for note in router.offline_notes():
            logger.warning(note)

    async def chat(self, provider_name: str, request: dict[str, Any],
                   request_id: str) -> dict[str, Any]:
        return await self.providers.chat(provider_name, request, request_id)

    async def chat_stream(self, provider_name: str, request: dict[str, Any],
                          request_id: str) -> AsyncIterator[dict[str, Any]]:
        async for chunk in self.providers.chat_stream(provider_name, request, request_id):
            yield chunk

    def status(self) -> dict[str, Any]:
        """Per provider: model, has_key, breaker state (no secrets)."""
        return self.providers.status()
