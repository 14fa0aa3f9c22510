"""The agent's LLM port and one adapter for it.

The runner only needs `await llm.complete(request) -> OpenAI chat completion dict`, where
`request` is an OpenAI chat request dict (model, messages, tools, tool_choice, max_tokens,
temperature, user). Failures are raised as `ApiError`. If the answer's `usage` carries
`cost_usd`, the runner charges that; otherwise it prices tokens with the agent settings.

`OpenAICompatibleLLM` speaks HTTP to any OpenAI-compatible server (the stack's own gateway,
a vLLM server, the scripted model of the tests).
"""
from __future__ import annotations

import os
from typing import Any, Protocol

import httpx

from serve_app.errors import ApiError, is_error_payload


class LLMPort(Protocol):
    async def complete(self, request: dict[str, Any]) -> dict[str, Any]: ...


class OpenAICompatibleLLM:
    def __init__(self, base_url: str, *, api_key: str | None = None,
                 api_key_env: str | None = None, timeout_s: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        key = api_key if api_key is not None else (os.environ.get(api_key_env)
                                                   if api_key_env else None)
        self._headers = {"authorization": f"Bearer {key}"} if key else {}
        self.timeout_s = timeout_s

    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s, trust_env=False) as client:
                response = await client.post(f"{self.base_url}/chat/completions",
                                             json=request, headers=self._headers)
        except httpx.TimeoutException as exc:
            raise ApiError(504, "The agent's model did not answer in time.",
                           code="timeout") from exc
        except httpx.HTTPError as exc:
            raise ApiError(502, "The agent's model could not be reached.",
                           code="upstream_error") from exc
        try:
            body = response.json()
        except ValueError as exc:
            raise ApiError(502, "The agent's model sent an invalid answer.",
                           code="upstream_error") from exc
        if response.status_code >= 400 or not isinstance(body, dict) or "choices" not in body:
            message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
            status = 429 if response.status_code == 429 else 502
            raise ApiError(status, f"The agent's model failed: {message or response.status_code}",
                           code="upstream_error")
        return body


async def call_port(llm: LLMPort, request: dict[str, Any]) -> dict[str, Any]:
    """Call the port; error payloads (from deployment handles) become ApiErrors."""
    result = await llm.complete(request)
    if is_error_payload(result):
        raise ApiError.from_payload(result)
    if not isinstance(result, dict) or not result.get("choices"):
        raise ApiError(502, "The agent's model returned no choices.", code="upstream_error")
    return result
