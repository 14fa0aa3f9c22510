"""Cached answers as responses: a fresh completion body, a replayed stream, and the
reverse (a streamed answer assembled into the body that gets stored). Pure functions."""
from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from serve_app.quota.pricing import token_cost_usd

ZERO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
_STORABLE_FINISH = frozenset({"stop", "length"})


def is_storable(completion: Mapping[str, Any]) -> bool:
    """A plain text answer: no error, no tool calls, every choice finished normally."""
    if completion.get("object") not in (None, "chat.completion") or "error" in completion:
        return False
    choices = completion.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    for choice in choices:
        message = choice.get("message") or {}
        if message.get("tool_calls") or not isinstance(message.get("content"), str):
            return False
        if not message["content"] or choice.get("finish_reason") not in _STORABLE_FINISH:
            return False
    return True


def cached_completion(answer: Mapping[str, Any], *, now: float | None = None) -> dict[str, Any]:
    """The stored body as a new response: new id and time, usage 0 (no model ran)."""
    body = copy.deepcopy(dict(answer))
    body["id"] = _completion_id()
    body["object"] = "chat.completion"
    body["created"] = int(time.time() if now is None else now)
    body["usage"] = dict(ZERO_USAGE)
    return body


def completion_chunks(answer: Mapping[str, Any], *, include_usage: bool = False,
                      chunk_chars: int = 0, now: float | None = None) -> list[dict[str, Any]]:
    """The stored body as OpenAI stream chunks: role, content (whole, or `chunk_chars`
    at a time), finish reason, and with include_usage a last chunk with usage 0."""
    completion_id = _completion_id()
    created = int(time.time() if now is None else now)
    model = answer.get("model", "")

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk",
                                   "created": created, "model": model, "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return payload

    chunks: list[dict[str, Any]] = []
    for choice in answer.get("choices") or []:
        index = choice.get("index", 0)
        content = (choice.get("message") or {}).get("content") or ""
        chunks.append(chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}]))
        size = chunk_chars if chunk_chars > 0 else max(1, len(content))
        for start in range(0, len(content), size):
            chunks.append(chunk([{"index": index,
                                  "delta": {"content": content[start:start + size]},
                                  "logprobs": None, "finish_reason": None}]))
        chunks.append(chunk([{"index": index, "delta": {}, "logprobs": None,
                              "finish_reason": choice.get("finish_reason") or "stop"}]))
    if include_usage:
        chunks.append(chunk([], dict(ZERO_USAGE)))
    return chunks


def completion_from_chunks(chunks: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Assemble streamed chunks into a chat.completion body; None when the stream
    carried an error or tool calls (not cacheable) or no content."""
    texts: dict[int, list[str]] = {}
    finish: dict[int, str | None] = {}
    first: Mapping[str, Any] | None = None
    usage: Mapping[str, Any] | None = None
    for item in chunks:
        if "error" in item or item.get("__error__"):
            return None
        first = first or item
        if item.get("usage"):
            usage = item["usage"]
        for choice in item.get("choices") or []:
            index = int(choice.get("index", 0))
            delta = choice.get("delta") or {}
            if delta.get("tool_calls"):
                return None
            texts.setdefault(index, [])
            if delta.get("content"):
                texts[index].append(delta["content"])
            if choice.get("finish_reason"):
                finish[index] = choice["finish_reason"]
    if first is None or not texts:
        return None
    body = {
        "id": first.get("id") or _completion_id(), "object": "chat.completion",
        "created": first.get("created") or int(time.time()), "model": first.get("model", ""),
        "choices": [{"index": index, "message": {"role": "assistant",
                                                 "content": "".join(texts[index])},
                     "logprobs": None, "finish_reason": finish.get(index)}
                    for index in sorted(texts)],
    }
    if usage:
        body["usage"] = dict(usage)
    return body if is_storable(body) else None


def estimated_saving_usd(usage: Mapping[str, Any] | None, input_usd_per_mtok: float,
                         output_usd_per_mtok: float) -> float:
    """What the cached answer cost when it was generated (its recorded usage)."""
    if not usage:
        return 0.0
    return token_cost_usd(int(usage.get("prompt_tokens", 0)),
                          int(usage.get("completion_tokens", 0)),
                          input_usd_per_mtok, output_usd_per_mtok)


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"
