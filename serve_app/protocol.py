"""OpenAI wire models (pydantic, no logic). Unknown fields are accepted and ignored, as
clients send many optional OpenAI parameters; the ones that change behaviour are here."""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.json_schemas import check_client_schema, reject_unpaired_surrogates

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_OUTPUT_TOKENS = 1_000_000  # far above any model; bounds what a reservation multiplies


class WireModel(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class TextPart(WireModel):
    type: Literal["text"]
    text: str


class ToolCallFunction(WireModel):
    name: str
    arguments: str


class ToolCall(WireModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(WireModel):
    include_usage: bool = False


class FunctionDefinition(WireModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    @field_validator("parameters")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_client_schema(value)


class ToolDefinition(WireModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionRequest(WireModel):
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_OUTPUT_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_OUTPUT_TOKENS)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    tools: list[ToolDefinition] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    # vLLM extensions (as its OpenAI server accepts them).
    min_tokens: int | None = Field(None, ge=0, le=MAX_OUTPUT_TOKENS)
    ignore_eos: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        reject_unpaired_surrogates(data)
        return data

    @field_validator("response_format")
    @classmethod
    def _valid_response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        kind = value.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError("type must be 'text', 'json_object' or 'json_schema'")
        if kind == "json_schema":
            spec = value.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise ValueError("json_schema.schema must be a JSON Schema object")
            check_client_schema(spec["schema"])
        return value

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return value

    def output_token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class EmbeddingRequest(WireModel):
    model: str = Field(min_length=1)
    input: str | list[str] = Field(...)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        reject_unpaired_surrogates(data)
        return data

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Usage(WireModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    """OpenAI's base64 format: little-endian float32 bytes (what the SDK asks for)."""
    if encoding_format == "base64":
        import base64

        import numpy as np

        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return vector
