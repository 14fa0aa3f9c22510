"""Prefix-cache-aware replica choice for LocalLLM, with Ray Serve's own router.

`ray.serve.llm`'s PrefixCacheAffinityRouter sends a request to the replica whose vLLM
prefix cache most likely holds its prompt's beginning (a prefix tree of what each replica
was sent), and falls back to power-of-two choices when replicas are unevenly loaded. It
reads the prompt from an argument with a `messages` or `prompt` attribute (its own
request objects); LocalLLM's calls carry the OpenAI request as a dict, so this subclass
reads the dict too. A call without a prompt (a health probe) routes with no prefix.

Configs name it per deployment: `request_router_config: {request_router_class:
deployments.llm_routing:PromptPrefixRouter}` (configs/gpu.yaml, configs/cluster-local.yaml).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.serve.llm.request_router import PrefixCacheAffinityRouter


def prompt_of(args: tuple[Any, ...]) -> Any:
    """The messages (or prompt) of a call's first request-like argument, else None."""
    for arg in args:
        if isinstance(arg, Mapping):
            for field in ("messages", "prompt"):
                if arg.get(field) is not None:
                    return arg[field]
        for field in ("messages", "prompt"):
            value = getattr(arg, field, None)
            if value is not None:
                return value
    return None


class PromptPrefixRouter(PrefixCacheAffinityRouter):
    def _extract_text_from_request(self, pending_request: Any) -> str:
        prompt = prompt_of(tuple(pending_request.args))
        return "" if prompt is None else self._normalize_prompt_to_string(prompt)
