"""Per-request record: filled in by the pipeline, written as one JSON log line at the end."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def request_id_from(header_value: str | None) -> str:
    """Reuse a caller's well-formed x-request-id (for tracing across systems), else mint one."""
    if header_value and _REQUEST_ID_OK.match(header_value):
        return header_value
    return uuid.uuid4().hex


@dataclass
class RequestContext:
    request_id: str
    route: str
    method: str
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

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    def stage(self, name: str, started: float) -> None:
        self.stages_ms[name] = round((time.perf_counter() - started) * 1000, 2)

    def to_log(self) -> dict[str, Any]:
        record = asdict(self)
        record.pop("started")
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
