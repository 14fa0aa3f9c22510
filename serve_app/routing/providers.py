"""OpenAI-compatible provider client (openai.AsyncOpenAI): chat pass-through, streaming
too, every failure mapped onto `UpstreamError` (see routing/errors.py).

Same conventions as serve_app/llm/vllm_engine.py: results are OpenAI dicts (a completion,
or chat.completion.chunk dicts whose last one carries `usage`). This class makes one attempt
per call; retries and the circuit breaker live in routing/remote.py.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import openai

from serve_app.routing.config import ProviderSettings
from serve_app.routing.errors import UpstreamError
from serve_app.routing.retry import parse_retry_after

# Chat parameters forwarded to a provider; everything else a client sent (vLLM extensions,
# unknown fields) stays here. `model` and the stream flags are set per provider.
OPENAI_CHAT_PARAMS = frozenset({
    "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed",
    "n", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
    "tools", "tool_choice", "parallel_tool_calls", "response_format", "user",
})
NO_KEY_PLACEHOLDER = "no-key-needed"
MAX_MESSAGE_CHARS = 300

ClientFactory = Callable[[ProviderSettings, str], Any]


def provider_request(request: Mapping[str, Any], model: str, stream: bool) -> dict[str, Any]:
    params = {key: value for key, value in request.items() if key in OPENAI_CHAT_PARAMS}
    params["model"] = model
    if stream:
        params["stream"] = True
        params["stream_options"] = {"include_usage": True}
    return params


def map_exception(exc: BaseException) -> UpstreamError:
    """SDK / asyncio exception -> UpstreamError (timeout checked before connection: the
    SDK's APITimeoutError is a subclass of APIConnectionError)."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, (openai.APITimeoutError, asyncio.TimeoutError, TimeoutError)):
        return UpstreamError("timeout", "no answer within the timeout")
    if isinstance(exc, openai.APIConnectionError):
        return UpstreamError("connect", "connection failed or was dropped")
    if isinstance(exc, openai.APIStatusError):
        headers = dict(exc.response.headers) if exc.response is not None else {}
        return UpstreamError.from_status(exc.status_code, _short(_status_message(exc)),
                                         retry_after=parse_retry_after(headers))
    if isinstance(exc, ValueError):  # json.loads: the body is not JSON
        return UpstreamError("server", "the provider's answer is not JSON")
    if isinstance(exc, openai.APIError):
        # An error event inside a stream, or an unparsable answer: the provider misbehaved.
        return UpstreamError("server", _short(getattr(exc, "message", "") or str(exc)))
    return UpstreamError("connect", f"{type(exc).__name__} while calling the provider")


def _status_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return f"HTTP {exc.status_code}"


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "..."


def _default_client(settings: ProviderSettings, api_key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=settings.base_url, api_key=api_key, max_retries=0,
        timeout=openai.Timeout(settings.timeout_s, connect=settings.connect_timeout_s))


class ProviderClient:
    """One attempt per call against one provider. Raises UpstreamError."""

    def __init__(self, settings: ProviderSettings, environ: Mapping[str, str] | None = None,
                 client_factory: ClientFactory = _default_client) -> None:
        self.settings = settings
        key = settings.api_key(environ)
        self.has_key = settings.available(environ)
        self._client = client_factory(settings, key or NO_KEY_PLACEHOLDER)

    @property
    def name(self) -> str:
        return self.settings.name

    async def complete(self, request: Mapping[str, Any], request_id: str) -> dict[str, Any]:
        params = provider_request(request, self.settings.model, stream=False)
        try:
            # The raw body, not the SDK's pydantic model: building that model and dumping
            # it back to a dict was a tenth of the Gateway's CPU per request (py-spy).
            raw = await asyncio.wait_for(
                self._client.chat.completions.with_raw_response.create(
                    **params, extra_headers={"x-request-id": request_id}),
                self.settings.timeout_s)
            result = json.loads(raw.content)
        except Exception as exc:
            raise map_exception(exc) from exc
        if not isinstance(result, dict) or not isinstance(result.get("choices"), list):
            raise UpstreamError("server", "the provider's answer is not a chat completion")
        return result

    async def stream(self, request: Mapping[str, Any],
                     request_id: str) -> AsyncIterator[dict[str, Any]]:
        """Chunks as dicts. The wait for each chunk is bounded by timeout_s (the SDK's read
        timeout). Any failure, before or after chunks were yielded, raises UpstreamError."""
        params = provider_request(request, self.settings.model, stream=True)
        stream = None
        try:
            stream = await asyncio.wait_for(
                self._client.chat.completions.create(
                    **params, extra_headers={"x-request-id": request_id}),
                self.settings.timeout_s)
            async for chunk in stream:
                yield chunk.model_dump(mode="json", exclude_unset=True)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            raise map_exception(exc) from exc
        finally:
            if stream is not None:
                await _close_quietly(stream)

    async def aclose(self) -> None:
        await _close_quietly(self._client)


async def _close_quietly(resource: Any) -> None:
    close = getattr(resource, "close", None)
    if close is None:
        return
    try:
        result = close()
        if asyncio.iscoroutine(result):
            await result
    except Exception:  # closing a broken connection may fail again; nothing to do
        pass
