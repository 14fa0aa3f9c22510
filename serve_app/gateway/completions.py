"""Helpers over OpenAI completion bodies (pure)."""
from __future__ import annotations

from typing import Any


def completion_as_chunks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A finished completion (or error payload) as the chunks of a stream: the whole message
    in one delta, the finish reason, then a usage chunk."""
    if result.get("__error__"):
        return [result]
    choice = result["choices"][0]
    base = {"id": result["id"], "object": "chat.completion.chunk",
            "created": result["created"], "model": result["model"]}
    message = dict(choice["message"])
    if message.get("tool_calls"):
        message["tool_calls"] = [dict(call, index=i)
                                 for i, call in enumerate(message["tool_calls"])]
    first = {**base, "choices": [{"index": 0, "delta": message, "finish_reason": None}]}
    last = {**base, "choices": [{"index": 0, "delta": {},
                                 "finish_reason": choice["finish_reason"]}]}
    usage = {**base, "choices": [], "usage": result["usage"]}
    return [first, last, usage]
