"""The fallback chain walker with fake targets (plain callables, no Ray, no network)."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serve_app.errors import ApiError
from serve_app.routing.errors import UpstreamError
from serve_app.routing.fallback import FallbackChain, Hop, Target, fallback_header, has_output

REQUEST = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}


def completion(name: str) -> dict[str, Any]:
    return {"id": f"chatcmpl-{name}", "object": "chat.completion", "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": name},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


def chunk(content: str | None = None, *, role: bool = False, finish: str | None = None,
          usage: dict | None = None) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role:
        delta = {"role": "assistant", "content": ""}
    if content is not None:
        delta["content"] = content
    out: dict[str, Any] = {"object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        out = {"object": "chat.completion.chunk", "choices": [], "usage": usage}
    return out


def payload(status: int, code: str | None = None, hop: str | None = None) -> dict[str, Any]:
    data = ApiError(status, f"failed with {status}", code=code).to_payload()
    if hop:
        data["hop"] = hop
    return data


class FakeTarget:
    """Scripted behaviour: a completion, an error payload, or an exception to raise;
    for streams, a list of chunks where an Exception item is raised at that point."""

    def __init__(self, name: str, *, result: Any = None, stream_items: list[Any] | None = None,
                 skip: str | None = None, hang_s: float = 0.0) -> None:
        self.name = name
        self.result = result if result is not None else completion(name)
        self.stream_items = stream_items if stream_items is not None else [
            chunk(role=True), chunk(f"{name} "), chunk("says hi"), chunk(finish="stop"),
            chunk(usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})]
        self.skip = skip
        self.hang_s = hang_s
        self.calls = 0
        self.closed = False

    async def complete(self, request: dict[str, Any], request_id: str) -> dict[str, Any]:
        self.calls += 1
        if self.hang_s:
            await asyncio.sleep(self.hang_s)
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result

    async def stream(self, request: dict[str, Any], request_id: str):
        self.calls += 1
        try:
            for item in self.stream_items:
                if self.hang_s:
                    await asyncio.sleep(self.hang_s)
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.closed = True

    def target(self, first_output_timeout_s: float | None = None) -> Target:
        return Target(self.name, self.complete, self.stream, lambda: self.skip,
                      model=f"{self.name}-model", first_output_timeout_s=first_output_timeout_s)


def chain(*targets: FakeTarget, timeout: float | None = None) -> FallbackChain:
    return FallbackChain([t.target(timeout) for t in targets], label="tier medium")


async def collect(outcome) -> list[dict[str, Any]]:
    return [item async for item in outcome.chunks]


# ----------------------------------------------------------------------------- complete
async def test_first_target_answers_without_hops():
    a, b = FakeTarget("a"), FakeTarget("b")
    outcome = await chain(a, b).complete(REQUEST, "r1")
    assert outcome.target.name == "a" and outcome.hops == []
    assert outcome.fallback_header is None
    assert b.calls == 0


@pytest.mark.parametrize("failure,reason", [
    (payload(503, "upstream_unavailable", hop="503"), "503"),
    (payload(504, "upstream_timeout", hop="timeout"), "timeout"),
    (payload(429, "upstream_rate_limited", hop="429"), "429"),
    (payload(503, "circuit_open", hop="circuit_open"), "circuit_open"),
    (payload(502, "upstream_auth", hop="auth"), "auth"),
    (payload(503, "engine_unavailable"), "503"),
    (ApiError(504, "handle timed out", code="timeout"), "timeout"),
    (UpstreamError("connect", "refused"), "connect"),
    (asyncio.TimeoutError(), "timeout"),
    (RuntimeError("replica died"), "error"),
])
async def test_fallback_on_each_failure(failure, reason):
    a, b = FakeTarget("provider-a", result=failure), FakeTarget("provider-b")
    outcome = await chain(a, b).complete(REQUEST, "r1")
    assert outcome.target.name == "provider-b"
    assert outcome.body["model"] == "provider-b"
    assert outcome.fallback_header == f"provider-a:{reason}>provider-b"


async def test_skipped_targets_are_not_called_but_recorded():
    a = FakeTarget("openai-mini", skip="no_key")
    b = FakeTarget("openai-frontier", skip="circuit_open")
    local = FakeTarget("local")
    outcome = await chain(a, b, local).complete(REQUEST, "r1")
    assert (a.calls, b.calls, local.calls) == (0, 0, 1)
    assert outcome.fallback_header == "openai-mini:no_key>openai-frontier:circuit_open>local"


async def test_request_errors_do_not_fall_back():
    a = FakeTarget("a", result=payload(400, "upstream_bad_request"))
    b = FakeTarget("b")
    with pytest.raises(ApiError) as caught:
        await chain(a, b).complete(REQUEST, "r1")
    assert caught.value.status == 400 and b.calls == 0


async def test_request_error_after_a_hop_keeps_the_header():
    a = FakeTarget("a", result=payload(503))
    b = FakeTarget("b", result=payload(422))
    with pytest.raises(ApiError) as caught:
        await chain(a, b).complete(REQUEST, "r1")
    assert caught.value.status == 422
    assert caught.value.headers["x-fallback"] == "a:503"


async def test_whole_chain_down_is_a_clear_503():
    a = FakeTarget("provider-a", result=payload(503, hop="503"))
    b = FakeTarget("provider-b", result=UpstreamError("timeout", "slow"))
    c = FakeTarget("local", skip="overloaded")
    with pytest.raises(ApiError) as caught:
        await chain(a, b, c).complete(REQUEST, "r1")
    error = caught.value
    assert error.status == 503 and error.code == "all_targets_failed"
    assert "provider-a (503)" in error.message and "provider-b (timeout)" in error.message
    assert "local (overloaded)" in error.message
    assert error.headers["x-fallback"] == "provider-a:503>provider-b:timeout>local:overloaded"


async def test_exhausted_chain_passes_on_the_shortest_retry_after():
    limited = payload(429, "upstream_rate_limited", hop="429")
    limited["headers"] = {"retry-after": "7"}
    other = payload(429, "upstream_rate_limited", hop="429")
    other["headers"] = {"retry-after": "3"}
    with pytest.raises(ApiError) as caught:
        await chain(FakeTarget("a", result=limited), FakeTarget("b", result=other)
                    ).complete(REQUEST, "r1")
    assert caught.value.headers["retry-after"] == "3"


# ----------------------------------------------------------------------------- streams
async def test_stream_from_the_first_target():
    a = FakeTarget("a")
    outcome = await chain(a, FakeTarget("b")).stream(REQUEST, "r1")
    chunks = await collect(outcome)
    assert outcome.target.name == "a" and outcome.fallback_header is None
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                   if c["choices"]) == "a says hi"
    assert chunks[-1]["usage"]["completion_tokens"] == 2
    assert a.closed


async def test_stream_failing_before_first_token_falls_back():
    # The role chunk came, then the connection dropped: nothing was shown yet.
    a = FakeTarget("provider-a", stream_items=[chunk(role=True), UpstreamError("connect", "x")])
    b = FakeTarget("provider-b")
    outcome = await chain(a, b).stream(REQUEST, "r1")
    chunks = await collect(outcome)
    assert outcome.fallback_header == "provider-a:connect>provider-b"
    assert a.closed
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "provider-b says hi"
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")) == 1


async def test_stream_error_payload_before_output_falls_back():
    a = FakeTarget("a", stream_items=[payload(503, "circuit_open", hop="circuit_open")])
    outcome = await chain(a, FakeTarget("b")).stream(REQUEST, "r1")
    assert outcome.fallback_header == "a:circuit_open>b"


async def test_empty_stream_falls_back():
    outcome = await chain(FakeTarget("a", stream_items=[chunk(role=True)]),
                          FakeTarget("b")).stream(REQUEST, "r1")
    assert outcome.fallback_header == "a:empty>b"


async def test_stream_with_no_first_output_in_time_falls_back():
    slow = FakeTarget("local", hang_s=5)
    outcome = await chain(slow, FakeTarget("remote"), timeout=0.05).stream(REQUEST, "r1")
    assert outcome.fallback_header == "local:timeout>remote"
    assert slow.closed


async def test_stream_failing_after_tokens_ends_with_an_error_and_no_fallback():
    a = FakeTarget("provider-a", stream_items=[chunk(role=True), chunk("partial "),
                                                chunk("answ"), UpstreamError("connect", "x")])
    b = FakeTarget("provider-b")
    outcome = await chain(a, b).stream(REQUEST, "r1")
    chunks = await collect(outcome)
    assert b.calls == 0 and outcome.fallback_header is None
    last = chunks[-1]
    assert last["__error__"] and last["status"] == 502
    assert last["code"] == "upstream_stream_failed"
    assert not any(c.get("choices") and c["choices"][0].get("finish_reason")
                   for c in chunks[:-1])


async def test_error_payload_after_tokens_is_passed_through_as_the_last_item():
    late = payload(502, "upstream_stream_failed", hop="stream")
    a = FakeTarget("a", stream_items=[chunk("one"), late, chunk("never sent")])
    chunks = await collect(await chain(a).stream(REQUEST, "r1"))
    assert chunks[-1] == late and len(chunks) == 2


async def test_stream_whole_chain_down():
    a = FakeTarget("a", stream_items=[UpstreamError("timeout", "x")])
    b = FakeTarget("b", stream_items=[payload(503, hop="503")])
    with pytest.raises(ApiError) as caught:
        await chain(a, b).stream(REQUEST, "r1")
    assert caught.value.status == 503
    assert caught.value.headers["x-fallback"] == "a:timeout>b:503"


async def test_stream_request_error_is_raised():
    a = FakeTarget("a", stream_items=[payload(400, "invalid")])
    with pytest.raises(ApiError) as caught:
        await chain(a, FakeTarget("b")).stream(REQUEST, "r1")
    assert caught.value.status == 400


def test_helpers():
    assert fallback_header([], "a") is None
    assert fallback_header([Hop("a", "429"), Hop("b", "timeout")], "c") == "a:429>b:timeout>c"
    assert not has_output(chunk(role=True))
    assert has_output(chunk("x")) and has_output(chunk(finish="length"))
    assert has_output(chunk(usage={"prompt_tokens": 1}))
    with pytest.raises(ValueError):
        FallbackChain([])


# ----------------------------------------------------------------------------- builder
async def test_chain_builder_offline_default_answers_locally():
    from serve_app.routing.chains import ChainBuilder, TargetCalls
    from serve_app.routing.config import RouterSettings

    local = FakeTarget("local")
    remote_calls: list[str] = []

    def remote(name: str) -> TargetCalls:
        fake = FakeTarget(name)

        async def complete(request, rid):
            remote_calls.append(name)
            return await fake.complete(request, rid)

        return TargetCalls(complete, fake.stream)

    builder = ChainBuilder(RouterSettings(), local=TargetCalls(local.complete, local.stream),
                           remote=remote, local_model="smollm2-135m-instruct", environ={})
    outcome = await builder.for_tier("large").complete(REQUEST, "r")
    assert outcome.target.name == "local" and outcome.target.model == "smollm2-135m-instruct"
    assert outcome.fallback_header == "openai-frontier:no_key>openai-mini:no_key>local"
    assert remote_calls == []
    small = await builder.for_tier("small").complete(REQUEST, "r")
    assert small.target.name == "local" and small.fallback_header is None

    online = ChainBuilder(RouterSettings(), local=TargetCalls(local.complete, local.stream),
                          remote=remote, local_model="m", environ={"OPENAI_API_KEY": "k"})
    answered = await online.for_tier("medium").complete(REQUEST, "r")
    assert answered.target.name == "openai-mini" and answered.target.model == "gpt-4o-mini"
    assert remote_calls == ["openai-mini"]
    with pytest.raises(ValueError):
        online.for_tier("huge")
