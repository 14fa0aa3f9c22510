"""Class 4: whatever happens after admission, the reservation is settled and one usage row
is written: errors, unexpected exceptions, a client that leaves at any point of a stream,
a stream that never starts. Class 1 (ids) at the pipeline level: internal ids are the
server's, whatever the client sends."""
from __future__ import annotations

import asyncio

import pytest

from serve_app.errors import ApiError
from serve_app.protocol import ChatCompletionRequest
from tests.support.chat_harness import LOCAL, FakeAccounting, ScriptedLocal, context, make_service


def chat(stream: bool = False, **extra) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": LOCAL, "messages": [{"role": "user", "content": "hello"}], "stream": stream,
         **extra})


async def settled(service) -> None:
    await asyncio.sleep(0)
    await service.drain()


async def test_success_settles_once_under_the_server_id() -> None:
    service, accounting, local, _ = make_service()
    ctx = context()
    await service.handle(chat(), ctx, "sk-aaaaaaaaaaaa_" + "b" * 32)
    await settled(service)
    assert [row["status"] for row in accounting.rows] == [200]
    row = accounting.rows[0]
    # the reservation, the ledger row and the engine request share the server's id
    assert row["request_id"] == ctx.request_id == accounting.admitted[0]["request_id"]
    assert local.request_ids == [ctx.request_id]
    assert row["client_request_id"] == "client-chosen" != ctx.request_id


@pytest.mark.parametrize("failure", [RuntimeError("boom"), UnicodeEncodeError(
    "utf-8", "\ud800", 0, 1, "surrogates not allowed"), KeyError("x")])
async def test_unexpected_exception_after_admission_settles_and_is_a_clean_500(failure) -> None:
    service, accounting, local, _ = make_service()
    local.fail = failure
    with pytest.raises(ApiError) as caught:
        await service.handle(chat(), context(), "sk-aaaaaaaaaaaa_" + "b" * 32)
    # the local target is the last of its chain: an exception there is a failed hop
    assert caught.value.status in (500, 503)
    await settled(service)
    assert len(accounting.rows) == 1 and accounting.rows[0]["status"] == caught.value.status


async def test_exception_outside_the_targets_settles_with_500(monkeypatch) -> None:
    service, accounting, _, _ = make_service()

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug in a stage")

    monkeypatch.setattr(service.router, "decide", broken)
    with pytest.raises(ApiError) as caught:
        await service.handle(chat(), context(), "sk-aaaaaaaaaaaa_" + "b" * 32)
    assert caught.value.status == 500 and caught.value.code == "internal_error"
    await settled(service)
    assert [(r["status"], r["error_code"]) for r in accounting.rows] == [(500, "internal_error")]


async def test_client_gone_during_a_non_streaming_answer_still_writes_the_row() -> None:
    service, accounting, _, _ = make_service(local=ScriptedLocal(delay_s=0.5))
    task = asyncio.ensure_future(service.handle(chat(), context(), "sk-aaaaaaaaaaaa_" + "b" * 32))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settled(service)
    assert [r["status"] for r in accounting.rows] == [499]


@pytest.mark.parametrize("leave_after", [0, 1, 3, 6, 7])
async def test_client_leaving_at_any_chunk_of_a_stream_writes_one_row(leave_after) -> None:
    service, accounting, _, _ = make_service(local=ScriptedLocal(words=6))
    ctx = context()
    outcome = await service.handle(chat(stream=True), ctx, "sk-aaaaaaaaaaaa_" + "b" * 32)
    stream = outcome.stream
    received = 0
    async for _ in stream:
        received += 1
        if received > leave_after:
            break
    await stream.aclose()
    service.settle_in_background(ctx, 499)  # what the HTTP edge does at the end; no-op twice
    await settled(service)
    assert len(accounting.rows) == 1


async def test_disconnect_while_the_row_is_being_written_does_not_lose_it() -> None:
    """The client goes away right after the last chunk, while settlement is in flight."""
    accounting = FakeAccounting(settle_delay_s=0.3)
    service, accounting, _, _ = make_service(accounting=accounting)
    outcome = await service.handle(chat(stream=True), context(), "sk-aaaaaaaaaaaa_" + "b" * 32)

    async def consume() -> None:
        async for _ in outcome.stream:
            pass

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(0.15)  # content sent; the generator now awaits settlement
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settled(service)
    assert [r["status"] for r in accounting.rows] == [200]


async def test_a_stream_that_never_starts_is_settled_by_the_edge() -> None:
    service, accounting, _, _ = make_service()
    ctx = context()
    outcome = await service.handle(chat(stream=True), ctx, "sk-aaaaaaaaaaaa_" + "b" * 32)
    assert outcome.stream is not None and ctx.admitted and not ctx.settled
    service.settle_in_background(ctx, 0)  # the client left before the first byte
    await settled(service)
    assert [(r["status"], r["error_code"]) for r in accounting.rows] == [
        (499, "client_disconnected")]


async def test_missing_or_malformed_keys_never_reach_accounting() -> None:
    service, accounting, _, _ = make_service()
    for key in (None, "not-a-key", "sk-short"):
        with pytest.raises(ApiError) as caught:
            await service.handle(chat(), context(), key)
        assert caught.value.status == 401
    assert accounting.admitted == [] and accounting.rows == []


async def test_settlement_runs_outside_the_request_context() -> None:
    """Ray Serve cancels the handle calls an ingress request made once that request is
    cancelled (its client left), finding them through the request's context variables.
    The usage row is written from a fresh context, so it is never one of them."""
    import contextvars

    request_scope: contextvars.ContextVar[str | None] = contextvars.ContextVar(
        "request_scope", default=None)
    seen: list[str | None] = []
    accounting = FakeAccounting()
    original = accounting.settle

    async def settle(row):
        seen.append(request_scope.get())
        await original(row)

    accounting.settle = settle
    service, accounting, _, _ = make_service(accounting=accounting)
    request_scope.set("the client's request")
    await service.handle(chat(), context(), "sk-aaaaaaaaaaaa_" + "b" * 32)
    await settled(service)
    assert seen == [None] and len(accounting.rows) == 1
