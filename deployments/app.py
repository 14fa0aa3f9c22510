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
    services = {"quota": quota_shards(settings), "cache": SemanticCache.bind(settings),
                "retriever": Retriever.bind(settings),
                "classifier": ComplexityClassifier.bind(settings)}
    # The Gateway and the AgentRunner each build the chat pipeline over the same services,
    # so an agent's LLM steps never call back into the Gateway.
    agent = AgentRunner.bind(settings, **services)
    return Gateway.bind(settings, agent=agent, **services)


def quota_shard_names(shards: int) -> list[str]:
    """One shard keeps the plain name 'Quota'; more are Quota-0..Quota-N-1."""
    return ["Quota"] if shards == 1 else [f"Quota-{shard}" for shard in range(shards)]


def quota_shards(settings: StackAppSettings) -> list[Application]:
    """One single-replica Quota deployment per shard; the clients pick a key's owner
    (serve_app.quota.sharding)."""
    return [Quota.options(name=name).bind(settings, shard)
            for shard, name in enumerate(quota_shard_names(settings.quota.shards))]


def expand_quota_overrides(stack_app: dict[str, Any]) -> None:
    """A stack app config whose `quota.shards` differs from its deployment overrides (e.g.
    one `Quota` entry and `shards: 4`): the overrides of the first name apply to every
    shard. Serve refuses overrides of deployments an app does not have."""
    shards = int(stack_app.get("args", {}).get("quota", {}).get("shards", 1))
    wanted = quota_shard_names(shards)
    entries = stack_app.get("deployments") or []
    quota = [d for d in entries if d.get("name") == "Quota" or
             str(d.get("name", "")).startswith("Quota-")]
    if not quota or {d["name"] for d in quota} == set(wanted):
        return
    template = {k: v for k, v in quota[0].items() if k != "name"}
    others = [d for d in entries if d not in quota]
    stack_app["deployments"] = others + [{"name": name, **template} for name in wanted]
