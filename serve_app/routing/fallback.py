"""Walk a tier's fallback chain. Independent of Ray: targets are plain callables.

For each target in order:
- skipped when its `skip_reason()` says so (circuit_open, no_key, overloaded);
- tried, and left behind on a fallback-worthy failure: connection error, timeout, 5xx,
  429, provider auth/not-found, an open breaker reported by the target, or a stream that
  fails (or ends, or times out) before its first output. Output means a chunk carrying
  content, tool calls, a finish_reason or usage; a lone role chunk is not output.
- a failure that is the request's own fault (400, 413, 422 ...) stops the walk at once and
  is raised as is (another model would reject it too).

Once a stream has produced output it is committed to that target. If it fails later, the
stream ends with one error payload (`code: upstream_stream_failed`, status 502), which the
HTTP edge sends as an SSE `error` event followed by `[DONE]`: the client sees the failure,
never a silent truncation with a clean finish_reason. It is not retried, as the client has
already received part of an answer.

Every hop is recorded as `target:reason`; `x-fallback` is the hops joined by '>' and ended
by the target that answered, e.g. "provider-a:timeout>provider-b". When every target fails
the walk raises ApiError 503 (`code: all_targets_failed`) naming each hop.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from serve_app.errors import ApiError, is_error_payload
from serve_app.routing.errors import FALLBACK_CODES, UpstreamError, is_retryable_status

logger = logging.getLogger(__name__)

CompleteFn = Callable[[dict[str, Any], str], Awaitable[dict[str, Any]]]
StreamFn = Callable[[dict[str, Any], str], AsyncIterator[dict[str, Any]]]


@dataclass
class Target:
    """One hop of a chain. `complete` returns an OpenAI completion dict or an error payload
    (or raises); `stream` yields chunk dicts and maybe one final error payload (or raises)."""

    name: str
    complete: CompleteFn
    stream: StreamFn
    skip_reason: Callable[[], str | None] = lambda: None
    model: str | None = None  # what x-model reports when this target answers
    first_output_timeout_s: float | None = None  # streams: give up waiting for output


@dataclass
class Hop:
    target: str
    reason: str


@dataclass
class Failure:
    reason: str
    fallback: bool
    error: ApiError


@dataclass
class ChainOutcome:
    target: Target
    hops: list[Hop] = field(default_factory=list)
    body: dict[str, Any] | None = None
    chunks: AsyncIterator[dict[str, Any]] | None = None

    @property
    def fallback_header(self) -> str | None:
        return fallback_header(self.hops, self.target.name)


def fallback_header(hops: list[Hop], answered: str | None) -> str | None:
    if not hops:
        return None
    parts = [f"{hop.target}:{hop.reason}" for hop in hops]
    if answered:
        parts.append(answered)
    return ">".join(parts)


def has_output(chunk: dict[str, Any]) -> bool:
    if chunk.get("usage"):
        return True
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls") or choice.get("finish_reason"):
            return True
    return False


def classify(failure: BaseException | dict[str, Any]) -> Failure:
    """Error payload or exception -> short hop reason, fall back or not, client error."""
    if isinstance(failure, dict):
        error = ApiError.from_payload(failure)
        reason = failure.get("hop") or _reason_for(error)
        return Failure(reason, _fallback_worthy(error), error)
    if isinstance(failure, UpstreamError):
        return Failure(failure.hop, failure.fallback, failure.to_api_error("upstream"))
    if isinstance(failure, ApiError):
        return Failure(_reason_for(failure), _fallback_worthy(failure), failure)
    if isinstance(failure, (asyncio.TimeoutError, TimeoutError)):
        return Failure("timeout", True, ApiError(504, "no answer in time", code="timeout"))
    return Failure("error", True, ApiError(503, f"{type(failure).__name__}",
                                           code="service_unavailable"))


def _fallback_worthy(error: ApiError) -> bool:
    return is_retryable_status(error.status) or (error.code in FALLBACK_CODES)


def _reason_for(error: ApiError) -> str:
    if error.code in ("circuit_open", "no_key", "overloaded"):
        return error.code
    if error.status == 504 or error.code in ("timeout", "upstream_timeout"):
        return "timeout"
    return str(error.status)


class FallbackChain:
    def __init__(self, targets: list[Target], *, label: str = "chain",
                 on_failure: Callable[[str, str, ApiError], None] | None = None) -> None:
        """`on_failure(target, reason, error)` hears of every fallback-worthy failure (the
        router's provider-health memory)."""
        if not targets:
            raise ValueError("a fallback chain needs at least one target")
        self.targets = targets
        self.label = label
        self.on_failure = on_failure

    # ------------------------------------------------------------------ non-streaming
    async def complete(self, request: dict[str, Any], request_id: str) -> ChainOutcome:
        hops: list[Hop] = []
        failures: list[Failure] = []
        for target in self.targets:
            if self._skipped(target, hops):
                continue
            try:
                result = await target.complete(request, request_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # classified below; never reaches the client raw
                result = exc
            if isinstance(result, dict) and not is_error_payload(result):
                return ChainOutcome(target=target, hops=hops, body=result)
            failure = classify(result)
            self._hop(target, failure, hops, failures, request_id)
        raise self._exhausted(hops, failures)

    # ------------------------------------------------------------------ streaming
    async def stream(self, request: dict[str, Any], request_id: str) -> ChainOutcome:
        """Resolves once a target produced its first output; `chunks` then replays what was
        buffered and relays the rest (ending with an error payload on a late failure)."""
        hops: list[Hop] = []
        failures: list[Failure] = []
        for target in self.targets:
            if self._skipped(target, hops):
                continue
            iterator = target.stream(request, request_id)
            buffered: list[dict[str, Any]] = []
            failure: Failure | None = None
            try:
                while True:
                    item = await _next(iterator, target.first_output_timeout_s)
                    if item is None:
                        failure = Failure("empty", True, ApiError(
                            503, f"{target.name} returned an empty stream",
                            code="service_unavailable"))
                        break
                    if is_error_payload(item):
                        failure = classify(item)
                        break
                    buffered.append(item)
                    if has_output(item):
                        return ChainOutcome(target=target, hops=hops,
                                            chunks=_relay(target, buffered, iterator))
            except asyncio.CancelledError:
                await _aclose(iterator)
                raise
            except Exception as exc:  # classified below
                failure = classify(exc)
            await _aclose(iterator)
            self._hop(target, failure, hops, failures, request_id)
        raise self._exhausted(hops, failures)

    # ------------------------------------------------------------------ helpers
    def _skipped(self, target: Target, hops: list[Hop]) -> bool:
        reason = target.skip_reason()
        if reason:
            hops.append(Hop(target.name, reason))
            return True
        return False

    def _hop(self, target: Target, failure: Failure, hops: list[Hop],
             failures: list[Failure], request_id: str) -> None:
        if not failure.fallback:
            header = fallback_header(hops, None)
            if header:
                failure.error.headers = {**failure.error.headers, "x-fallback": header}
            raise failure.error
        logger.warning("fallback %s: %s failed (%s) for request %s", self.label, target.name,
                       failure.reason, request_id)
        if self.on_failure is not None:
            self.on_failure(target.name, failure.reason, failure.error)
        hops.append(Hop(target.name, failure.reason))
        failures.append(failure)

    def _exhausted(self, hops: list[Hop], failures: list[Failure]) -> ApiError:
        tried = ", ".join(f"{hop.target} ({hop.reason})" for hop in hops)
        headers = {"x-fallback": fallback_header(hops, None) or ""}
        waits = [float(f.error.headers["retry-after"]) for f in failures
                 if "retry-after" in f.error.headers]
        if waits:
            headers["retry-after"] = str(int(max(1, min(waits))))
        return ApiError(503, f"No model could answer ({self.label}): every target in the "
                        f"fallback chain failed or is unavailable: {tried}. Retry later.",
                        code="all_targets_failed", headers=headers)


async def _next(iterator: AsyncIterator[dict[str, Any]],
                timeout_s: float | None) -> dict[str, Any] | None:
    try:
        if timeout_s is None:
            return await iterator.__anext__()
        return await asyncio.wait_for(iterator.__anext__(), timeout_s)
    except StopAsyncIteration:
        return None


async def _relay(target: Target, buffered: list[dict[str, Any]],
                 iterator: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    try:
        for chunk in buffered:
            yield chunk
        async for chunk in iterator:
            yield chunk
            if is_error_payload(chunk):
                return
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as exc:
        logger.warning("stream from %s failed after output was sent: %s", target.name,
                       type(exc).__name__)
        yield ApiError(502, f"{target.name} failed in the middle of the answer; the "
                       "answer above is incomplete.", code="upstream_stream_failed").to_payload()
    finally:
        await _aclose(iterator)


async def _aclose(iterator: Any) -> None:
    close = getattr(iterator, "aclose", None)
    try:
        if close is not None:
            await close()
        elif hasattr(iterator, "cancel"):
            iterator.cancel()
    except Exception:  # a broken stream may fail to close; nothing left to do
        pass
