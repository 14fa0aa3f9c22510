"""The FastAPI app every Gateway route module registers on (one app per process)."""
from __future__ import annotations

from fastapi import FastAPI, Request

from serve_app.accounts.keys import bearer_token
from serve_app.http_edge import RequestEdgeMiddleware, install_error_handlers

app = FastAPI(title="LLM production stack", version="0.1.0",
              description="OpenAI-compatible gateway on Ray Serve: keys, limits, budgets, "
              "semantic cache, routing with fallback, RAG and agents.")
install_error_handlers(app)
app.add_middleware(RequestEdgeMiddleware)


def api_key_of(request: Request) -> str | None:
    return bearer_token(request.headers.get("authorization"), request.headers.get("x-api-key"))
