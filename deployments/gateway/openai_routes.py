"""OpenAI-compatible routes and health probes."""
from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from deployments.gateway.fastapi_app import api_key_of, app
from serve_app.errors import ApiError
from serve_app.http_edge import context_of
from serve_app.protocol import ChatCompletionRequest, EmbeddingRequest, encode_embedding
from serve_app.routing.gateway_router import WorstCase


class OpenAIRoutes:
    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Ready only when the local model answers a one-token generation (reused for
        gateway.readiness_cache_s, so probes cannot load the engine)."""
        result = await self.readiness.check()
        if not result.get("ready"):
            return JSONResponse({"status": "not_ready", "reason": result.get("reason")},
                                status_code=503)
        return JSONResponse({"status": "ready", "model": result.get("model")})

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        await self.authenticate(request)
        models = await self.models()
        aliases = [{"id": alias, "object": "model", "created": 0, "owned_by": "rag",
                    "model": target.model, "collection": target.collection}
                   for alias, target in self.settings.rag.model_aliases.items()]
        return {"object": "list", "data": [models["chat"], models["embedding"],
                                           *self.chat.router.catalog(), *aliases]}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        await self.models()
        outcome = await self.chat.handle(body, context_of(request), api_key_of(request),
                                         request.headers)
        if outcome.stream is not None:
            return StreamingResponse(outcome.stream, media_type="text/event-stream",
                                     headers={**outcome.headers, "cache-control": "no-cache"})
        return JSONResponse(outcome.body, headers=outcome.headers)

    @app.post("/v1/embeddings")
    async def embeddings(self, body: EmbeddingRequest, request: Request) -> JSONResponse:
        models = await self.models()
        context = context_of(request)
        served = models["embedding"]["id"]
        texts = body.texts()
        # WordPiece makes at most one token per character, plus [CLS] and [SEP].
        bound = sum(len(text) + 2 for text in texts)
        await self.chat.admit(context, api_key=api_key_of(request), model=body.model,
                              model_known=body.model == served,
                              worst=WorstCase(tokens=bound, prompt_tokens=bound,
                                              cost_usd=self.settings.price_of(served).cost(
                                                  bound, 0)))
        try:
            response = await self._embed(body, texts, served, models["embedding"])
        except ApiError as error:
            context.error_code = error.code
            await self.chat.settle(context, error.status)
            raise
        context.model = served
        context.tokens_in = response["usage"]["prompt_tokens"]
        context.cost_usd = self.settings.price_of(served).cost(context.tokens_in, 0)
        await self.chat.settle(context, 200)
        return JSONResponse(response)

    async def _embed(self, body: EmbeddingRequest, texts: list[str], served: str,
                     info: dict[str, Any]) -> dict[str, Any]:
        if not texts or any(not t for t in texts):
            raise ApiError(400, "input must be a non-empty string or list of non-empty strings",
                           param="input")
        limit = self.settings.gateway.max_embedding_inputs
        if len(texts) > limit:
            raise ApiError(400, f"input has {len(texts)} items; at most {limit} per request",
                           param="input")
        if body.dimensions is not None and body.dimensions != info["dimensions"]:
            raise ApiError(400, f"{served} has {info['dimensions']} dimensions; it cannot "
                           "shorten them", param="dimensions")
        result = await self.embedder.call("embed_with_usage", texts,
                                          timeout_s=self.settings.gateway.request_timeout_s)
        data = [{"object": "embedding", "index": i,
                 "embedding": encode_embedding(vector, body.encoding_format)}
                for i, vector in enumerate(result["vectors"])]
        return {"object": "list", "data": data, "model": served,
                "usage": {"prompt_tokens": result["tokens"], "total_tokens": result["tokens"]}}
