"""LocalLLM: a vLLM engine replica (1 GPU each on a cluster, the CPU build of vLLM here).
Thin shell: the engine logic lives in serve_app.llm.vllm_engine."""
from __future__ import annotations

import fcntl
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from serve_app.errors import error_boundary
from serve_app.llm.prompt import read_tokenizer_files
from serve_app.llm.vllm_engine import VLLMChatEngine
from serve_app.model_prep import default_model_dir, ensure_default_model
from serve_app.protocol import ChatCompletionRequest
from serve_app.settings import ModelsAppSettings


def _model_path(settings: ModelsAppSettings) -> str:
    if settings.local_llm.path:
        return settings.local_llm.path
    # Several replicas may start at once: one converts, the others wait on the lock.
    lock_path = default_model_dir(settings.data_dir).with_suffix(".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return str(ensure_default_model(settings.data_dir))


@serve.deployment(name="LocalLLM", max_ongoing_requests=64, health_check_period_s=5,
                  health_check_timeout_s=30, graceful_shutdown_timeout_s=10)
@error_boundary("local model", code="engine_unavailable")
class LocalLLM:
    def __init__(self, settings: dict[str, Any]) -> None:
        parsed = ModelsAppSettings.model_validate(settings)
        self.engine = VLLMChatEngine(parsed.local_llm, _model_path(parsed))
        self.engine.start()

    async def chat(self, request: dict[str, Any], request_id: str) -> dict[str, Any]:
        return await self.engine.chat(ChatCompletionRequest.model_validate(request), request_id)

    async def chat_stream(self, request: dict[str, Any],
                          request_id: str) -> AsyncIterator[dict[str, Any]]:
        async for chunk in self.engine.chat_stream(
                ChatCompletionRequest.model_validate(request), request_id):
            yield chunk

    def model_info(self) -> dict[str, Any]:
        return self.engine.model_info()

    def tokenizer_files(self) -> dict[str, str]:
        """Tokenizer and chat template, so gateways count prompts exactly as this engine."""
        return read_tokenizer_files(self.engine.model_path)

    def running_requests(self) -> int:
        return self.engine.running_requests()

    async def check_health(self) -> None:
        # A dead engine fails the health check and Serve replaces the replica.
        await self.engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
