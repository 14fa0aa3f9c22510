"""Server-sent events in OpenAI's framing."""
from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def sse_error(status: int, message: str, code: str | None) -> bytes:
    """A failure after the stream started: OpenAI clients raise on a data event with 'error'."""
    from serve_app.errors import error_body

    return sse_event(error_body(status, message, code=code))
