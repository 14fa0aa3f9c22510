"""Checks for JSON Schemas that clients send (tool parameters, response_format).

A schema is the client's input like any other: a bad type, a dangling `$ref` or a huge or
deeply nested document must be a 4xx at the edge, never an engine failure that a fallback
chain would retry on a paid provider.
"""
from __future__ import annotations

import json
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

MAX_SCHEMA_BYTES = 64_000
MAX_SCHEMA_DEPTH = 32


def check_client_schema(schema: Any) -> dict[str, Any]:
    """The schema if it is a valid, self-contained Draft 2020-12 schema; else ValueError."""
    if not isinstance(schema, dict):
        raise ValueError("must be a JSON Schema object")
    size = len(json.dumps(schema, ensure_ascii=False))
    if size > MAX_SCHEMA_BYTES:
        raise ValueError(f"the schema has {size} bytes; at most {MAX_SCHEMA_BYTES}")
    refs = _walk(schema)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as error:
        where = "/".join(str(p) for p in error.path) or "(root)"
        raise ValueError(f"invalid JSON Schema at {where}: {error.message[:200]}") from None
    for ref in refs:
        _resolve_local(schema, ref)
    return schema


def _walk(schema: dict[str, Any]) -> list[str]:
    """Depth check and every `$ref`, iteratively (no recursion limit to hit)."""
    refs: list[str] = []
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None:
                if not isinstance(ref, str):
                    raise ValueError("$ref must be a string")
                refs.append(ref)
            stack.extend((value, depth + 1) for value in node.values())
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node)
    return refs


def _resolve_local(schema: dict[str, Any], ref: str) -> None:
    """Only references inside the document ('#', '#/$defs/x'); nothing is fetched."""
    if not ref.startswith("#"):
        raise ValueError(f"$ref {ref[:100]!r} points outside the schema; only local "
                         "references ('#/$defs/...') are allowed")
    node: Any = schema
    pointer = ref[1:]
    if not pointer:
        return
    if not pointer.startswith("/"):
        raise ValueError(f"$ref {ref[:100]!r} is not a JSON pointer")
    for raw in pointer[1:].split("/"):
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise ValueError(f"$ref {ref[:100]!r} does not resolve inside the schema")


def reject_unpaired_surrogates(value: Any) -> None:
    """JSON may escape lone surrogates ("\\ud800"); they are not text and break every
    encoder downstream. Iterative walk over strings and keys."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            _check_text(node)
        elif isinstance(node, dict):
            for key, item in node.items():
                if isinstance(key, str):
                    _check_text(key)
                stack.append(item)
        elif isinstance(node, list):
            stack.extend(node)


def _check_text(text: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text contains an unpaired UTF-16 surrogate; send valid "
                         "Unicode") from None
