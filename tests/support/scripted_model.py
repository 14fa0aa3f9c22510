"""A scripted OpenAI-compatible model: a real HTTP server (uvicorn in a background thread)
that answers `POST /v1/chat/completions` with the next scripted reply, in order, so agent
guardrails are tested deterministically. Also a small HTTP target that records requests
(for http.get / http.post tools).

    model = ScriptedModel().start()
    model.script(tool_call("files_write", {"path": "a", "content": "x"}), answer("done"))
    ... AgentService(..., llm=OpenAICompatibleLLM(model.base_url)) ...
    model.requests  # every request body received
    model.stop()
"""
from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections import deque
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def tool_call(name: str, arguments: Any, *more: tuple[str, Any], **reply: Any) -> dict[str, Any]:
    """A reply asking for one or more tool calls (`more`: extra (name, arguments) pairs).
    `arguments` may be a dict or a raw string (to send invalid JSON)."""
    calls = [(name, arguments), *more]
    return {"tool_calls": calls, **reply}


def answer(text: str, **reply: Any) -> dict[str, Any]:
    return {"content": text, **reply}


def failure(status: int = 503, message: str = "scripted failure") -> dict[str, Any]:
    return {"status": status, "error": message}


class BackgroundServer:
    """uvicorn serving an ASGI app on a free 127.0.0.1 port in a daemon thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> "BackgroundServer":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class ScriptedModel(BackgroundServer):
    def __init__(self, model_name: str = "scripted") -> None:
        self.model_name = model_name
        self.replies: deque[dict[str, Any]] = deque()
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        app = FastAPI()
        app.post("/v1/chat/completions")(self._complete)
        super().__init__(app)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def script(self, *replies: dict[str, Any]) -> None:
        """Replace the script: the next requests get these replies, in order."""
        with self._lock:
            self.replies = deque(replies)
            self.requests = []

    def start(self) -> "ScriptedModel":
        super().start()
        return self

    async def _complete(self, request: Request) -> JSONResponse:
        body = await request.json()
        with self._lock:
            self.requests.append(body)
            reply = self.replies.popleft() if self.replies else None
        if reply is None:
            return JSONResponse({"error": {"message": "the script is exhausted",
                                           "type": "server_error"}}, status_code=500)
        if "status" in reply:
            return JSONResponse({"error": {"message": reply["error"], "type": "server_error"}},
                                status_code=reply["status"])
        if reply.get("delay_s"):
            import asyncio

            await asyncio.sleep(reply["delay_s"])
        return JSONResponse(self._completion(body, reply))

    def _completion(self, body: dict[str, Any], reply: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply.get("content")}
        finish = "stop"
        if reply.get("tool_calls"):
            message["tool_calls"] = [
                {"id": reply.get("call_id", "call_0"), "type": "function",
                 "function": {"name": name, "arguments": args if isinstance(args, str)
                              else json.dumps(args)}}
                for name, args in reply["tool_calls"]]
            finish = "tool_calls"
        # Realistic usage: about 4 bytes per prompt token; completion capped by max_tokens
        # like a real model.
        prompt_tokens = reply.get("prompt_tokens",
                                  len(json.dumps(body.get("messages", []))) // 4 + 1)
        completion_tokens = min(reply.get("completion_tokens", 10),
                                int(body.get("max_tokens") or 10**9))
        usage: dict[str, Any] = {"prompt_tokens": prompt_tokens,
                                 "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens}
        if "cost_usd" in reply:
            usage["cost_usd"] = reply["cost_usd"]
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
                "created": int(time.time()), "model": body.get("model", self.model_name),
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": usage}


class RecordingTarget(BackgroundServer):
    """Answers any GET/POST with 200 and records method, path and body."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        app = FastAPI()
        app.api_route("/{path:path}", methods=["GET", "POST"])(self._record)
        super().__init__(app)

    def start(self) -> "RecordingTarget":
        super().start()
        return self

    async def _record(self, path: str, request: Request) -> JSONResponse:
        body = (await request.body()).decode()
        self.received.append({"method": request.method, "path": "/" + path, "body": body})
        return JSONResponse({"ok": True, "path": "/" + path, "echo": body})
