"""OpenAI-compatible routes and health probes. Chat and embeddings are authenticated by
their admission (one Quota call authenticates and reserves)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from deployments.gateway.dependencies import CallerDep, GatewayDep, api_key_of
from deployments.http_edge import context_of
from serve_app.errors import ApiError
from serve_app.gateway.router import WorstCase
from serve_app.protocol import ChatCompletionRequest, EmbeddingRequest, encode_embedding

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(gateway: GatewayDep) -> JSONResponse:
    """Ready only when the local model answers a one-token generation (reused for
    gateway.readiness_cache_s, so probes cannot load the engine)."""
    result = await gateway.readiness.check()
    if not result.get("ready"):
        return JSONResponse({"status": "not_ready", "reason": result.get("reason")},
                            status_code=503)
    return JSONResponse({"status": "ready", "model": result.get("model")})


@router.get("/v1/models")
async def list_models(gateway: GatewayDep, caller: CallerDep) -> dict[str, Any]:
    models = await gateway.pipeline.models()
    aliases = [{"id": alias, "object": "model", "created": 0, "owned_by": "rag",
                "model": target.model, "collection": target.collection}
               for alias, target in gateway.settings.rag.model_aliases.items()]
    return {"object": "list", "data": [models["chat"], models["embedding"],
                                       *gateway.chat.router.catalog(), *aliases]}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           gateway: GatewayDep):
    await gateway.pipeline.models()
    outcome = await gateway.chat.handle(body, context_of(request), api_key_of(request),
                                        request.headers)
    if outcome.stream is not None:
        return StreamingResponse(outcome.stream, media_type="text/event-stream",
                                 headers={**outcome.headers, "cache-control": "no-cache"})
    return JSONResponse(outcome.body, headers=outcome.headers)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request,
                     gateway: GatewayDep) -> JSONResponse:
    models = await gateway.pipeline.models()
    context = context_of(request)
    served = models["embedding"]["id"]
    price = gateway.settings.price_of(served)
    texts = body.texts()
    # WordPiece makes at most one token per character, plus [CLS] and [SEP].
    bound = sum(len(text) + 2 for text in texts)
    await gateway.chat.admit(context, api_key=api_key_of(request), model=body.model,
                             model_known=body.model == served,
                             worst=WorstCase(tokens=bound, prompt_tokens=bound,
                                             cost_usd=price.cost(bound, 0)))
    try:
        response = await _embed(gateway, body, texts, served, models["embedding"])
    except ApiError as error:
        context.error_code = error.code
        await gateway.chat.settle(context, error.status)
        raise
    context.model = served
    context.tokens_in = response["usage"]["prompt_tokens"]
    context.cost_usd = price.cost(context.tokens_in, 0)
    await gateway.chat.settle(context, 200)
    return JSONResponse(response)


async def _embed(gateway: Any, body: EmbeddingRequest, texts: list[str], served: str,
                 info: dict[str, Any]) -> dict[str, Any]:
    if not texts or any(not t for t in texts):
        raise ApiError(400, "input must be a non-empty string or list of non-empty strings",
                       param="input")
    limit = gateway.settings.gateway.max_embedding_inputs
    if len(texts) > limit:
        raise ApiError(400, f"input has {len(texts)} items; at most {limit} per request",
                       param="input")
    if body.dimensions is not None and body.dimensions != info["dimensions"]:
        raise ApiError(400, f"{served} has {info['dimensions']} dimensions; it cannot "
                       "shorten them", param="dimensions")
    result = await gateway.pipeline.embedder.call(
        "embed_with_usage", texts, timeout_s=gateway.settings.gateway.request_timeout_s)
    data = [{"object": "embedding", "index": i,
             "embedding": encode_embedding(vector, body.encoding_format)}
            for i, vector in enumerate(result["vectors"])]
    return {"object": "list", "data": data, "model": served,
            "usage": {"prompt_tokens": result["tokens"], "total_tokens": result["tokens"]}}
