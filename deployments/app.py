"""Application builders: the whole graph, wired in one place from validated settings.

Two Serve applications make up the stack:
- `models` (build_models_app): LocalLLM (vLLM) and Embedder, the slow-to-start GPU/CPU
  model replicas, under a tiny root deployment; no HTTP route.
- `stack` (build_app): the Gateway ingress and the services behind it. It reaches the
  models through handles by name, so it can be redeployed (keys, prices, routes, corpus
  settings) without reloading a model.
"""
from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.embedder import Embedder
from deployments.gateway import Gateway
from deployments.local_llm import LocalLLM
from deployments.models_root import ModelsRoot
from deployments.agent_runner import AgentRunner
from deployments.classifier import ComplexityClassifier
from deployments.quota import Quota
from deployments.retriever import Retriever
from deployments.semantic_cache import SemanticCache
from serve_app.settings import ModelsAppSettings, StackAppSettings


def build_models_app(args: dict[str, Any]) -> Application:
    # Validated once, here; the replicas receive the settings objects (pydantic returns a
    # validated instance as it is, so a shell's model_validate costs nothing).
    settings = ModelsAppSettings.model_validate(args)
    return ModelsRoot.bind(LocalLLM.bind(settings), Embedder.bind(settings))


def build_app(args: dict[str, Any]) -> Application:
    settings = StackAppSettings.model_validate(args)
    services = {"quota": Quota.bind(settings), "cache": SemanticCache.bind(settings),
                "retriever": Retriever.bind(settings),
                "classifier": ComplexityClassifier.bind(settings)}
    # The Gateway and the AgentRunner each build the chat pipeline over the same services,
    # so an agent's LLM steps never call back into the Gateway.
    agent = AgentRunner.bind(settings, **services)
    return Gateway.bind(settings, agent=agent, **services)
