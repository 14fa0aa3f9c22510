"""OpenAI chat request -> vLLM sampling parameters (pure; unit-tested without an engine)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serve_app.errors import ApiError
from serve_app.protocol import ChatCompletionRequest

# OpenAI's default temperature and top_p are 1.0.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0


@dataclass(frozen=True)
class GenerationPlan:
    """What the engine should run: sampling kwargs plus the checked token budget."""

    sampling: dict[str, Any]
    max_tokens: int


def plan_generation(
    request: ChatCompletionRequest,
    *,
    prompt_tokens: int,
    max_model_len: int,
    default_max_tokens: int,
) -> GenerationPlan:
    """Map the request, and reject what the model cannot do with a clear 400.

    An explicit max_tokens that does not fit next to the prompt is an error (as in OpenAI);
    the default is clamped to what is left of the context window.
    """
    if request.n != 1:
        raise ApiError(400, "only n=1 is supported", code="unsupported_parameter", param="n")
    room = max_model_len - prompt_tokens
    if room < 1:
        raise ApiError(
            400,
            f"This model's maximum context length is {max_model_len} tokens, but the "
            f"messages have {prompt_tokens} tokens. Shorten the messages.",
            code="context_length_exceeded",
            param="messages",
        )
    asked = request.output_token_limit()
    if asked is not None and asked > room:
        raise ApiError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. The messages "
            f"have {prompt_tokens} tokens and max_tokens asks for {asked}; the sum must "
            "not exceed the context length. Lower max_tokens or shorten the messages.",
            code="context_length_exceeded",
            param="max_tokens",
        )
    max_tokens = asked if asked is not None else min(default_max_tokens, room)
    sampling: dict[str, Any] = {
        "n": 1,
        "temperature": DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
        "top_p": DEFAULT_TOP_P if request.top_p is None else request.top_p,
        "max_tokens": max_tokens,
        "stop": request.stop_list() or None,
        "seed": request.seed,
        "presence_penalty": request.presence_penalty or 0.0,
        "frequency_penalty": request.frequency_penalty or 0.0,
        "min_tokens": min(request.min_tokens or 0, max_tokens),
        "ignore_eos": bool(request.ignore_eos),
    }
    return GenerationPlan(sampling=sampling, max_tokens=max_tokens)


def finish_reason(vllm_reason: str | None) -> str | None:
    """vLLM finish reasons -> OpenAI's ('abort' is reported as a stop the client caused)."""
    if vllm_reason is None:
        return None
    return {"stop": "stop", "length": "length", "abort": "stop"}.get(vllm_reason, vllm_reason)
