"""Embedder: sentence-transformers with dynamic batching (@serve.batch) across requests."""
from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from serve_app.errors import error_boundary
from serve_app.embedding import TextEmbedder
from serve_app.settings import ModelsAppSettings


@serve.deployment(name="Embedder", max_ongoing_requests=256)
@error_boundary("embedder", code="embedder_unavailable")
class Embedder:
    def __init__(self, settings: dict[str, Any]) -> None:
        parsed = ModelsAppSettings.model_validate(settings).embedder
        self.settings = parsed
        self.embedder = TextEmbedder(parsed.model, torch_threads=parsed.torch_threads)
        self._embed_batched.set_max_batch_size(parsed.max_batch_size)
        self._embed_batched.set_batch_wait_timeout_s(parsed.batch_wait_timeout_s)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """Each text joins a cross-request batch; order is preserved."""
        return list(await asyncio.gather(*(self._embed_batched(text) for text in texts)))

    async def embed_with_usage(self, texts: list[str]) -> dict[str, Any]:
        vectors = await self.embed(texts)
        return {"vectors": vectors, "tokens": self.embedder.count_tokens(texts)}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _embed_batched(self, texts: list[str]) -> list[list[float]]:
        # Encoding runs in a thread so the replica keeps answering while a batch runs.
        return (await asyncio.to_thread(self.embedder.embed, texts)).tolist()

    def model_info(self) -> dict[str, Any]:
        return {"id": self.settings.served_name, "object": "model", "created": 0,
                "owned_by": "local-sentence-transformers", "dimensions": self.embedder.dim}
