"""A real HTTP server speaking the OpenAI chat completions API, with injectable faults.

It stands in for a paid provider (the only thing outside this machine). It is a plain
asyncio HTTP/1.1 server on 127.0.0.1 in a background thread, written by hand rather than
with uvicorn so that it can misbehave the way real networks do: drop the connection
before answering, or in the middle of a chunked SSE stream.

Use from pytest:

    from tests.support.fake_provider import FakeProvider, Fault

    @pytest.fixture
    def provider():
        with FakeProvider(name="provider-a") as fake:
            yield fake

    provider.base_url                          # "http://127.0.0.1:<port>/v1"
    provider.enqueue(Fault(status=500))        # the next request gets a 500
    provider.enqueue(Fault(status=429, retry_after="2"), Fault(drop=True))
    provider.set_default(Fault(latency_s=5))   # every request after the queue is empty
    provider.calls                             # chat requests received
    provider.requests[-1]                      # the last request body (dict)
    provider.reset()

Faults (one `Fault` per request; the queue is consumed first, then the default):
- latency_s: wait before answering (and before the first chunk of a stream)
- status (+ retry_after, retry_after_ms): answer with this HTTP status and an OpenAI error body
- drop: close the socket right after reading the request, without a byte of answer
- drop_after_chunks: streaming only: close the socket after K `data:` chunks (mid-stream)
- chunk_delay_s: pause between streamed chunks

Or control it over HTTP (e.g. when started as `python -m tests.support.fake_provider`):
POST /_admin/enqueue {"faults": [{...}]}, POST /_admin/default {...}, POST /_admin/reset,
GET /_admin/stats -> {"calls": N, "requests": [...]}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class Fault:
    latency_s: float = 0.0
    status: int | None = None
    retry_after: str | None = None
    retry_after_ms: str | None = None
    drop: bool = False
    drop_after_chunks: int | None = None
    chunk_delay_s: float = 0.0
    garbage: str | None = None  # a 200 whose body is this text, not a completion

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> "Fault":
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown fault fields {sorted(unknown)}")
        return cls(**value)


NO_FAULT = Fault()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeProvider:
    def __init__(self, name: str = "fake-provider", *, reply: str | None = None,
                 api_key: str | None = None, port: int = 0, host: str = "127.0.0.1") -> None:
        self.name = name
        self.reply = reply or f"Hello from {name}. This answer comes in several chunks."
        self.api_key = api_key
        self.host = host
        self.port = port or free_port()
        self.calls = 0
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._queue: deque[Fault] = deque()
        self._default = NO_FAULT
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._writers: set[asyncio.StreamWriter] = set()

    # ---------------------------------------------------------------- control (Python)
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def enqueue(self, *faults: Fault) -> None:
        with self._lock:
            self._queue.extend(faults)

    def set_default(self, fault: Fault | None) -> None:
        with self._lock:
            self._default = fault or NO_FAULT

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self._default = NO_FAULT
            self.calls = 0
            self.requests.clear()
            self.headers.clear()

    def _next_fault(self, body: dict[str, Any], headers: dict[str, str]) -> Fault:
        with self._lock:
            self.calls += 1
            self.requests.append(body)
            self.headers.append(headers)
            return self._queue.popleft() if self._queue else self._default

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "FakeProvider":
        self._thread = threading.Thread(target=self._run, name=f"fake-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake provider did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> "FakeProvider":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._server = loop.run_until_complete(
            asyncio.start_server(self._handle, self.host, self.port))
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        assert self._server is not None and self._loop is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop.stop()

    # ---------------------------------------------------------------- HTTP
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            request = await _read_request(reader)
            if request is None:
                return
            method, path, headers, raw = request
            await self._dispatch(method, path, headers, raw, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            # Shutdown. Returning (not re-raising) keeps asyncio's stream callback from
            # logging the cancelled task as an error (Python 3.11).
            return
        finally:
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.close()

    async def _dispatch(self, method: str, path: str, headers: dict[str, str], raw: bytes,
                        writer: asyncio.StreamWriter) -> None:
        path = path.split("?", 1)[0]
        if path.startswith("/_admin/"):
            await self._admin(method, path, raw, writer)
            return
        if method == "GET" and path == "/v1/models":
            await _send_json(writer, 200, {"object": "list", "data": [
                {"id": self.name, "object": "model", "created": 0, "owned_by": "fake"}]})
            return
        if method != "POST" or path != "/v1/chat/completions":
            await _send_json(writer, 404, _error(404, f"no route {method} {path}"))
            return
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            await _send_json(writer, 400, _error(400, "body is not JSON"))
            return
        fault = self._next_fault(body, headers)
        if fault.drop:
            writer.transport.abort()  # RST, no answer at all
            return
        if fault.latency_s:
            await asyncio.sleep(fault.latency_s)
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            await _send_json(writer, 401, _error(401, "Incorrect API key provided"))
            return
        if fault.status is not None:
            extra = {}
            if fault.retry_after is not None:
                extra["retry-after"] = fault.retry_after
            if fault.retry_after_ms is not None:
                extra["retry-after-ms"] = fault.retry_after_ms
            await _send_json(writer, fault.status, _error(fault.status, "injected failure"),
                             extra)
            return
        if not isinstance(body.get("messages"), list) or not body.get("model"):
            await _send_json(writer, 400, _error(400, "model and messages are required"))
            return
        if fault.garbage is not None:
            data = fault.garbage.encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         + f"content-length: {len(data)}\r\nconnection: close\r\n\r\n".encode()
                         + data)
            await writer.drain()
            return
        if body.get("stream"):
            await self._stream(body, fault, writer)
        else:
            await _send_json(writer, 200, self._completion(body))

    def _pieces(self) -> list[str]:
        words = self.reply.split(" ")
        return [w if i == 0 else " " + w for i, w in enumerate(words)]

    def _usage(self, body: dict[str, Any], completion_tokens: int) -> dict[str, int]:
        prompt = sum(len(str(m.get("content") or "").split()) + 4 for m in body["messages"])
        return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                "total_tokens": prompt + completion_tokens}

    def _completion(self, body: dict[str, Any]) -> dict[str, Any]:
        pieces = self._pieces()
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if limit:
            pieces = pieces[:int(limit)]
        reason = "length" if limit and len(pieces) < len(self._pieces()) else "stop"
        return {"id": f"chatcmpl-fake-{self.calls}", "object": "chat.completion",
                "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "finish_reason": reason, "logprobs": None,
                             "message": {"role": "assistant", "content": "".join(pieces)}}],
                "usage": self._usage(body, len(pieces))}

    async def _stream(self, body: dict[str, Any], fault: Fault,
                      writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n"
                     b"connection: close\r\n\r\n")
        base = {"id": f"chatcmpl-fake-{self.calls}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": body["model"]}
        pieces = self._pieces()
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if limit:
            pieces = pieces[:int(limit)]
        chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}]
        chunks += [{**base, "choices": [{"index": 0, "delta": {"content": piece},
                                         "finish_reason": None}]} for piece in pieces]
        chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({**base, "choices": [], "usage": self._usage(body, len(pieces))})
        for sent, chunk in enumerate(chunks):
            if fault.drop_after_chunks is not None and sent >= fault.drop_after_chunks:
                await writer.drain()
                writer.transport.abort()  # mid-stream: no terminating chunk, no [DONE]
                return
            if sent and fault.chunk_delay_s:
                await asyncio.sleep(fault.chunk_delay_s)
            _write_chunk(writer, b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await writer.drain()
        _write_chunk(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _admin(self, method: str, path: str, raw: bytes,
                     writer: asyncio.StreamWriter) -> None:
        try:
            payload = json.loads(raw or b"{}")
            if method == "POST" and path == "/_admin/enqueue":
                self.enqueue(*(Fault.from_dict(f) for f in payload.get("faults", [])))
            elif method == "POST" and path == "/_admin/default":
                self.set_default(Fault.from_dict(payload))
            elif method == "POST" and path == "/_admin/reset":
                self.reset()
            elif not (method == "GET" and path == "/_admin/stats"):
                await _send_json(writer, 404, _error(404, f"no admin route {path}"))
                return
        except (ValueError, TypeError) as exc:
            await _send_json(writer, 400, _error(400, str(exc)))
            return
        with self._lock:
            stats = {"calls": self.calls, "requests": list(self.requests),
                     "queued": [asdict(f) for f in self._queue], "default": asdict(self._default)}
        await _send_json(writer, 200, stats)


async def _read_request(reader: asyncio.StreamReader
                        ) -> tuple[str, str, dict[str, str], bytes] | None:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) < 2:
        return None
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    body = await reader.readexactly(length) if length else b""
    return parts[0], parts[1], headers, body


def _error(status: int, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            429: "rate_limit_error"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


async def _send_json(writer: asyncio.StreamWriter, status: int, payload: dict[str, Any],
                     extra_headers: dict[str, str] | None = None) -> None:
    body = json.dumps(payload).encode()
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
              429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
              503: "Service Unavailable", 504: "Gateway Timeout"}.get(status, "Status")
    lines = [f"HTTP/1.1 {status} {reason}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close"]
    lines += [f"{k}: {v}" for k, v in (extra_headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    await writer.drain()


def _write_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the fake OpenAI-compatible provider.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="fake-provider")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    fake = FakeProvider(args.name, api_key=args.api_key, port=args.port).start()
    print(fake.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
