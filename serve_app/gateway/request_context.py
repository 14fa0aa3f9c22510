"""Per-request record: filled in by the pipeline, written as one JSON log line at the end."""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from serve_app import textmatch

_REQUEST_ID_OK = textmatch.compile(r"^[A-Za-z0-9._-]{1,64}$")  # a client header


def new_request_id() -> str:
    """The server's id of a request: the key of its reservation, ledger row and engine
    request. Never taken from a client, so no client can collide with another request."""
    return uuid.uuid4().hex


def client_request_id_from(header_value: str | None) -> str | None:
    """A caller's well-formed x-request-id, kept only as a correlation field."""
    if header_value and _REQUEST_ID_OK.match(header_value):
        return header_value
    return None


@dataclass
class RequestContext:
    request_id: str
    route: str
    method: str
    client_request_id: str | None = None  # the caller's x-request-id (correlation only)
    started: float = field(default_factory=time.perf_counter)
    status: int = 0
    model: str | None = None
    tenant: str | None = None
    key_id: str | None = None
    tier: str | None = None
    cache: str | None = None
    fallback: list[str] = field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    ttft_ms: float | None = None
    stream: bool = False
    error_code: str | None = None
    prompt: str | None = None
    stages_ms: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # Admission reserved quota for this request; `settled` once its usage row is written.
    # Whatever happens after admission, the pipeline or the HTTP edge settles it.
    admitted: bool = False
    settled: bool = False

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    def stage(self, name: str, started: float) -> None:
        self.stages_ms[name] = round((time.perf_counter() - started) * 1000, 2)

    def to_log(self) -> dict[str, Any]:
        record = asdict(self)
        for internal in ("started", "admitted", "settled"):
            record.pop(internal)
        record["latency_ms"] = round(self.elapsed_ms(), 2)
        record["ts"] = time.time()
        return {k: v for k, v in record.items() if v not in (None, [], {})}


def redact_prompt(text: str, mode: Literal["off", "hash", "full"]) -> str | None:
    if mode == "off":
        return None
    if mode == "hash":
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]
    return text


class RequestLogger:
    """One JSON line per request to stderr (Ray's log files) and to <data_dir>/logs."""

    def __init__(self, log_dir: Path | None) -> None:
        self.logger = logging.getLogger("llmstack.requests")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        if not self.logger.handlers:
            stream = logging.StreamHandler(sys.stderr)
            stream.setFormatter(logging.Formatter("%(message)s"))
            self.logger.addHandler(stream)
            if log_dir is not None:
                log_dir.mkdir(parents=True, exist_ok=True)
                file = logging.FileHandler(log_dir / "requests.jsonl")
                file.setFormatter(logging.Formatter("%(message)s"))
                self.logger.addHandler(file)

    def write(self, context: RequestContext) -> None:
        self.logger.info(json.dumps(context.to_log(), default=str, separators=(",", ":")))
