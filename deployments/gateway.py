"""Gateway: the ingress (FastAPI via @serve.ingress). A thin shell: routes parse the request,
call the pipeline in serve_app, and shape the HTTP response."""
from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from serve_app.chat_service import ChatService, ModelTarget
from serve_app.errors import ApiError
from serve_app.handles import LazyHandle, LocalLLMClient
from serve_app.http_edge import (
    RequestEdgeMiddleware,
    context_of,
    install_error_handlers,
    register_edge_hooks,
)
from serve_app.metrics import serve_metrics
from serve_app.protocol import ChatCompletionRequest, EmbeddingRequest, encode_embedding
from serve_app.request_context import RequestContext, RequestLogger
from serve_app.settings import StackAppSettings

app = FastAPI(title="LLM production stack", version="0.1.0",
              description="OpenAI-compatible gateway on Ray Serve.")
install_error_handlers(app)

app.add_middleware(RequestEdgeMiddleware)


@serve.deployment(name="Gateway", max_ongoing_requests=128)
@serve.ingress(app)
class Gateway:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = StackAppSettings.model_validate(settings)
        models_app = self.settings.models_app
        self.llm = LazyHandle("LocalLLM", models_app)
        self.embedder = LazyHandle("Embedder", models_app)
        self.metrics = serve_metrics()
        self.request_log = RequestLogger(self.settings.data_dir / "logs")
        self._model_info: dict[str, dict[str, Any]] = {}
        self.chat = ChatService(
            targets=self._targets,
            prompt_log_mode=self.settings.gateway.log_prompts,
            on_tokens=self._count_tokens,
            on_ttft=lambda model, s: self.metrics.ttft.observe(
                s, tags={"gen_ai_request_model": model}),
        )
        register_edge_hooks(max_body_bytes=self.settings.gateway.max_body_bytes,
                            on_complete=self.finish_request)

    # ------------------------------------------------------------------ wiring
    async def _models(self) -> dict[str, dict[str, Any]]:
        if not self._model_info:
            timeout = self.settings.gateway.readiness_probe_timeout_s
            llm = await self.llm.call("model_info", timeout_s=timeout)
            embedder = await self.embedder.call("model_info", timeout_s=timeout)
            self._model_info = {"chat": llm, "embedding": embedder}
        return self._model_info

    def _targets(self) -> dict[str, ModelTarget]:
        name = self._model_info["chat"]["id"]
        client = LocalLLMClient(self.llm, self.settings.gateway.request_timeout_s)
        return {name: ModelTarget(name=name, client=client)}

    def _count_tokens(self, model: str, tokens_in: int, tokens_out: int) -> None:
        self.metrics.tokens.inc(tokens_in, tags={"gen_ai_request_model": model,
                                                 "gen_ai_token_type": "input"})
        self.metrics.tokens.inc(tokens_out, tags={"gen_ai_request_model": model,
                                                  "gen_ai_token_type": "output"})

    def finish_request(self, context: RequestContext) -> None:
        route = context.route if context.route.startswith("/v1/") else "other"
        self.metrics.requests.inc(tags={"route": route, "status": str(context.status)})
        self.metrics.latency.observe(context.elapsed_ms() / 1000, tags={"route": route})
        self.request_log.write(context)

    # ------------------------------------------------------------------ routes
    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Ready only when the local model answers a one-token generation."""
        probe = {"model": "probe", "messages": [{"role": "user", "content": "ping"}],
                 "max_tokens": 1, "temperature": 0}
        try:
            models = await self._models()
            probe["model"] = models["chat"]["id"]
            await LocalLLMClient(self.llm, self.settings.gateway.readiness_probe_timeout_s
                                 ).complete(probe, f"readyz-{time.time_ns()}")
        except ApiError as error:
            return JSONResponse({"status": "not_ready", "reason": error.message},
                                status_code=503)
        return JSONResponse({"status": "ready", "model": probe["model"]})

    @app.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        models = await self._models()
        return {"object": "list", "data": [models["chat"], models["embedding"]]}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        await self._models()
        context = context_of(request)
        outcome = await self.chat.handle(body, context)
        if outcome.stream is not None:
            return StreamingResponse(outcome.stream, media_type="text/event-stream",
                                     headers={**outcome.headers, "cache-control": "no-cache"})
        return JSONResponse(outcome.body, headers=outcome.headers)

    @app.post("/v1/embeddings")
    async def embeddings(self, body: EmbeddingRequest, request: Request) -> JSONResponse:
        models = await self._models()
        context = context_of(request)
        served = models["embedding"]["id"]
        if body.model != served:
            raise ApiError(404, f"The embedding model '{body.model}' does not exist; "
                           f"use '{served}'.", code="model_not_found", param="model")
        texts = body.texts()
        if not texts or any(not t for t in texts):
            raise ApiError(400, "input must be a non-empty string or list of non-empty strings",
                           param="input")
        limit = self.settings.gateway.max_embedding_inputs
        if len(texts) > limit:
            raise ApiError(400, f"input has {len(texts)} items; at most {limit} per request",
                           param="input")
        result = await self.embedder.call("embed_with_usage", texts,
                                          timeout_s=self.settings.gateway.request_timeout_s)
        context.model = served
        context.tokens_in = result["tokens"]
        if body.dimensions is not None and body.dimensions != models["embedding"]["dimensions"]:
            raise ApiError(400, f"{served} has {models['embedding']['dimensions']} dimensions; "
                           "it cannot shorten them", param="dimensions")
        data = [{"object": "embedding", "index": i,
                 "embedding": encode_embedding(vector, body.encoding_format)}
                for i, vector in enumerate(result["vectors"])]
        return JSONResponse({"object": "list", "data": data, "model": served,
                             "usage": {"prompt_tokens": result["tokens"],
                                       "total_tokens": result["tokens"]}})

