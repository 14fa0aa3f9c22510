"""Load test of the chat endpoint (streaming and not), through the plain HTTP API.

    make run   # in another shell
    .venv/bin/locust -f benchmarks/locustfile.py --host http://127.0.0.1:8000 \
        --headless -u 8 -r 2 -t 2m --csv benchmarks/results/locust

Set LLMSTACK_API_KEY when the gateway requires keys.
"""
from __future__ import annotations

import json
import os
import random

from locust import HttpUser, between, task

MODEL = os.environ.get("LLMSTACK_MODEL", "smollm2-135m-instruct")
QUESTIONS = [
    "What is the capital of France?",
    "Give me a synonym for happy.",
    "Explain photosynthesis in one sentence.",
    "Name three planets of the solar system.",
    "What is 12 times 12?",
]


class ChatUser(HttpUser):
    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        key = os.environ.get("LLMSTACK_API_KEY")
        self.headers = {"authorization": f"Bearer {key}"} if key else {}

    def _body(self, stream: bool) -> dict:
        return {"model": MODEL, "max_tokens": 48, "temperature": 0.7, "stream": stream,
                "messages": [{"role": "user", "content": random.choice(QUESTIONS)}]}

    @task(3)
    def chat(self) -> None:
        with self.client.post("/v1/chat/completions", json=self._body(False),
                              headers=self.headers, catch_response=True,
                              name="chat") as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
            elif not response.json()["choices"][0]["message"]["content"]:
                response.failure("empty answer")

    @task(1)
    def chat_stream(self) -> None:
        with self.client.post("/v1/chat/completions", json=self._body(True), stream=True,
                              headers=self.headers, catch_response=True,
                              name="chat_stream") as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}")
                return
            events = 0
            for line in response.iter_lines():
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    if b'"error"' in line and "error" in json.loads(line[6:]):
                        response.failure("error event")
                        return
                    events += 1
            if events == 0:
                response.failure("no events")
