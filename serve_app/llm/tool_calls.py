"""OpenAI `tools` for models without native tool calling (pure logic).

The request's tools become a system instruction plus a JSON schema that vLLM's structured
output enforces, so a small local model always produces a parseable answer of the form
`{"tool_calls": [{"name": ..., "arguments": {...}}]}` or `{"content": "..."}`. The parsed
result is returned in OpenAI's shape (`message.tool_calls`, finish_reason `tool_calls`).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from serve_app import textmatch
from serve_app.errors import ApiError
from serve_app.protocol import ChatCompletionRequest

# A small model asked for calls tends to repeat them until max_tokens cuts the JSON off
# (measured on BFCL: 110 of 200 answers); a cap on the array stops that.
MAX_CALLS = 4
# Model output is untrusted text too: linear-time matching (serve_app.textmatch).
_CALLS_START = textmatch.compile(r'\s*\{\s*"tool_calls"\s*:\s*\[')


@dataclass(frozen=True)
class ToolCallFormat:
    tools: list[dict[str, Any]]  # OpenAI function definitions
    required: bool  # tool_choice "required" or a named function: no plain answer allowed

    @classmethod
    def for_request(cls, request: ChatCompletionRequest) -> "ToolCallFormat | None":
        if not request.tools or request.tool_choice == "none":
            return None
        functions = [tool.function.model_dump(exclude_none=True) for tool in request.tools]
        choice = request.tool_choice
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            chosen = [f for f in functions if f["name"] == name]
            if not chosen:
                raise ApiError(400, f"tool_choice names unknown function {name!r}",
                               param="tool_choice")
            return cls(tools=chosen, required=True)
        if choice not in (None, "auto", "required"):
            raise ApiError(400, "tool_choice must be 'none', 'auto', 'required' or a function",
                           param="tool_choice")
        return cls(tools=functions, required=choice == "required")

    # ------------------------------------------------------------------ prompt
    def instruction(self) -> str:
        specs = json.dumps(
            [{"name": f["name"], "description": f.get("description", ""),
              "parameters": f.get("parameters", {})} for f in self.tools],
            separators=(",", ":"),
        )
        answer = "" if self.required else (
            ' If no function fits the request, answer {"content": "<your answer>"} instead.')
        return (
            "You can call these functions:\n" + specs + "\n"
            'To call functions, answer only {"tool_calls": [{"name": "<function name>", '
            '"arguments": {<arguments as JSON>}}]}, one entry per call.' + answer
        )

    def prompt_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Inject the instruction and flatten tool traffic for plain chat templates."""
        flat: list[dict[str, Any]] = []
        for message in messages:
            role = message.get("role")
            if role == "assistant" and message.get("tool_calls"):
                calls = [{"name": c["function"]["name"],
                          "arguments": _loads_or_raw(c["function"]["arguments"])}
                         for c in message["tool_calls"]]
                flat.append({"role": "assistant", "content": json.dumps({"tool_calls": calls})})
            elif role == "tool":
                flat.append({"role": "user", "content":
                             f"Result of tool call {message.get('tool_call_id', '')}: "
                             f"{message.get('content', '')}"})
            elif role == "developer":
                flat.append({**message, "role": "system"})
            else:
                flat.append(message)
        if flat and flat[0]["role"] == "system":
            flat[0] = {**flat[0], "content": flat[0]["content"] + "\n\n" + self.instruction()}
        else:
            flat.insert(0, {"role": "system", "content": self.instruction()})
        return flat

    # ------------------------------------------------------------------ schema
    def output_schema(self) -> dict[str, Any]:
        call_variants = [
            {"type": "object",
             "properties": {"name": {"const": f["name"]},
                            "arguments": _object_schema(f.get("parameters"))},
             "required": ["name", "arguments"], "additionalProperties": False}
            for f in self.tools
        ]
        calls = {"type": "object",
                 "properties": {"tool_calls": {"type": "array", "minItems": 1,
                                               "maxItems": MAX_CALLS,
                                               "items": {"anyOf": call_variants}}},
                 "required": ["tool_calls"], "additionalProperties": False}
        if self.required:
            return calls
        answer = {"type": "object", "properties": {"content": {"type": "string"}},
                  "required": ["content"], "additionalProperties": False}
        return {"anyOf": [calls, answer]}

    # ------------------------------------------------------------------ parse
    def parse_output(self, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
        """Model output -> (OpenAI assistant message, finish_reason). Exact repeats of a
        call are dropped; the complete calls of an answer cut off by max_tokens are kept."""
        known = {f["name"] for f in self.tools}
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError):  # deep nesting: not JSON we can use
            # Only a truncated answer (max_tokens) can fail: structured output holds otherwise.
            calls = _complete_calls_prefix(text, known)
            if calls:
                return _calls_message(calls), "tool_calls"
            return {"role": "assistant", "content": text}, reason
        if isinstance(data, dict) and isinstance(data.get("tool_calls"), list):
            calls = [call for call in data["tool_calls"]
                     if isinstance(call, dict) and call.get("name") in known]
            if calls:
                return _calls_message(calls), "tool_calls"
        if isinstance(data, dict) and isinstance(data.get("content"), str):
            return {"role": "assistant", "content": data["content"]}, reason
        return {"role": "assistant", "content": text}, reason


def _calls_message(calls: list[dict[str, Any]]) -> dict[str, Any]:
    unique: list[dict[str, Any]] = []
    seen: set[str] = set()
    for call in calls:
        arguments = json.dumps(call.get("arguments", {}), sort_keys=True)
        if (call["name"], arguments) in seen:
            continue
        seen.add((call["name"], arguments))  # type: ignore[arg-type]
        unique.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                       "function": {"name": call["name"],
                                    "arguments": json.dumps(call.get("arguments", {}))}})
    return {"role": "assistant", "content": None, "tool_calls": unique}


def _complete_calls_prefix(text: str, known: set[str]) -> list[dict[str, Any]]:
    """The whole call objects at the start of a cut-off {"tool_calls": [...] answer."""
    match = _CALLS_START.match(text)
    if not match:
        return []
    decoder = json.JSONDecoder()
    position = match.end()
    calls = []
    while True:
        while position < len(text) and text[position] in " \n\t\r,":
            position += 1
        try:
            item, position = decoder.raw_decode(text, position)
        except (json.JSONDecodeError, RecursionError):
            return calls
        if isinstance(item, dict) and item.get("name") in known:
            calls.append(item)


def _object_schema(parameters: Any) -> dict[str, Any]:
    if isinstance(parameters, dict) and parameters.get("type") == "object":
        return _closed(parameters)
    return {"type": "object"}


def _closed(schema: Any) -> Any:
    """Objects that list their properties accept no others: a small model otherwise
    invents arguments (BFCL: a large share of the wrong answers)."""
    if isinstance(schema, dict):
        schema = {key: _closed(value) for key, value in schema.items()}
        if schema.get("type") == "object" and "properties" in schema:
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [_closed(item) for item in schema]
    return schema


def _loads_or_raw(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except (TypeError, json.JSONDecodeError):
        return arguments
