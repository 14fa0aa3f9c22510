"""ModelsRoot: the ingress of the `models` application. It keeps LocalLLM and Embedder in
one application graph and reports their status; clients reach the models through the
Gateway, which holds handles to them by name."""
from __future__ import annotations

from typing import Any

from ray import serve


@serve.deployment(name="ModelsRoot", num_replicas=1, ray_actor_options={"num_cpus": 0.01})
class ModelsRoot:
    def __init__(self, local_llm: Any, embedder: Any) -> None:
        self.local_llm = local_llm
        self.embedder = embedder

    async def status(self) -> dict[str, Any]:
        return {"chat": await self.local_llm.model_info.remote(),
                "embedding": await self.embedder.model_info.remote()}
