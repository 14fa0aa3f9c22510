"""The local model's prompt, built one way for the engine and for the gateway's counter.

`template_messages` is what goes into the chat template (tool definitions injected, tool
traffic flattened); `LocalPromptTokenizer` renders that template and tokenizes it exactly
as the engine does, from the tokenizer's files only (no transformers model classes, no
torch), so a Gateway replica can count a prompt's real tokens before admitting it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from serve_app.llm.tool_calls import ToolCallFormat
from serve_app.protocol import ChatCompletionRequest

# Files of a Hugging Face model directory that define tokenization and the chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json")


def template_messages(request: ChatCompletionRequest) -> list[dict[str, Any]]:
    messages = [_flatten_content(m.model_dump(exclude_none=True)) for m in request.messages]
    tools = ToolCallFormat.for_request(request)
    if tools is not None:
        messages = tools.prompt_messages(messages)
    return messages


def _flatten_content(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, list):
        message["content"] = "".join(part.get("text", "") for part in content)
    if content is None:
        message["content"] = ""
    return message


def read_tokenizer_files(model_dir: str | Path) -> dict[str, str]:
    """The tokenizer files of a local model directory, as text (sent to Gateway replicas,
    which may run on nodes without the model)."""
    root = Path(model_dir)
    return {name: (root / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES
            if (root / name).is_file()}


class LocalPromptTokenizer:
    """Renders the chat template and tokenizes it, as `apply_chat_template` does."""

    def __init__(self, files: dict[str, str]) -> None:
        from tokenizers import Tokenizer

        if "tokenizer.json" not in files:
            raise ValueError("the model has no tokenizer.json")
        self.tokenizer = Tokenizer.from_str(files["tokenizer.json"])
        config = json.loads(files.get("tokenizer_config.json", "{}"))
        template = files.get("chat_template.jinja") or config.get("chat_template")
        if template is None and "chat_template.json" in files:
            template = json.loads(files["chat_template.json"]).get("chat_template")
        if not isinstance(template, str):
            raise ValueError("the model has no chat template")
        self.template = template
        special = json.loads(files.get("special_tokens_map.json", "{}"))
        self.special_tokens: dict[str, str] = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(name, special.get(name))
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                self.special_tokens[name] = value

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered = render_jinja_template([messages], chat_template=self.template,
                                         add_generation_prompt=True, **self.special_tokens)
        text = rendered[0] if isinstance(rendered, tuple) else rendered
        if isinstance(text, list):
            text = text[0]
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def count(self, request: ChatCompletionRequest) -> int:
        return len(self.prompt_ids(template_messages(request)))
