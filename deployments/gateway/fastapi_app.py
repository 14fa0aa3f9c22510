"""The Gateway's FastAPI app: the edge middleware, the error handlers and every route
module's APIRouter (one app per process)."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from deployments.gateway import (admin_routes, agent_routes, cache_routes, console_routes,
                                 openai_routes, rag_routes)
from deployments.http_edge import RequestEdgeMiddleware, install_error_handlers

app = FastAPI(title="LLM production stack", version="0.1.0",
              description="OpenAI-compatible gateway on Ray Serve: keys, limits, budgets, "
              "semantic cache, routing with fallback, RAG and agents.")
install_error_handlers(app)
app.add_middleware(RequestEdgeMiddleware)
for module in (openai_routes, admin_routes, cache_routes, rag_routes, agent_routes,
               console_routes):
    app.include_router(module.router)
# The console's own CSS/JS and the npm assets vendored at set-up (serve_app.console.vendor).
app.mount(console_routes.PREFIX + "/static",
          StaticFiles(directory=console_routes.STATIC_DIR, check_dir=False),
          name="console-static")
