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
from deployments.remote_llm import RemoteLLM
from deployments.retriever import Retriever
from deployments.semantic_cache import SemanticCache
from serve_app.handles import GatewayLLMPort
from serve_app.settings import ModelsAppSettings, StackAppSettings


def build_models_app(args: dict[str, Any]) -> Application:
    settings = ModelsAppSettings.model_validate(args).model_dump(mode="json")
    return ModelsRoot.bind(LocalLLM.bind(settings), Embedder.bind(settings))


def build_app(args: dict[str, Any]) -> Application:
    settings = StackAppSettings.model_validate(args).model_dump(mode="json")
    retriever = Retriever.bind(settings)
    # The agent's LLM steps call back into the Gateway (routing + accounting); the
    # Gateway is found by name at run time, so the graph stays acyclic.
    agent = AgentRunner.bind(settings, llm=GatewayLLMPort(), retriever=retriever)
    return Gateway.bind(settings, quota=Quota.bind(settings),
                        cache=SemanticCache.bind(settings), retriever=retriever,
                        classifier=ComplexityClassifier.bind(settings),
                        remote=RemoteLLM.bind(settings), agent=agent)
