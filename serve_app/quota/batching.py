"""Coalesce concurrent calls into one batched call (pure asyncio, no Ray).

A Gateway replica under load makes many admit and settle calls at once; each handle call
costs about as much CPU as the work behind it. A `Batcher` sends what arrives while its
previous batch is in flight as the next batch, so a lone request goes out at once (no
added wait) and a busy replica sends one call per round trip instead of one per request.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")

# send(items) -> one outcome per item, in order: a result, or an exception for that item.
SendBatch = Callable[[list[Item]], Awaitable[list[Any]]]


class Batcher(Generic[Item]):
    def __init__(self, send: SendBatch[Item], *, max_batch: int = 256,
                 max_in_flight: int = 1) -> None:
        self.send = send
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._queue: list[tuple[Item, asyncio.Future[Any]]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Future[None]] = set()  # held: the loop keeps weak refs
        self.batches = 0  # sent so far (tests and benchmarks read it)

    async def submit(self, item: Item) -> Any:
        """The item's outcome; raises the item's exception, or the whole batch's."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Mark the outcome as seen even when the caller left (no 'never retrieved' log).
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._queue.append((item, future))
        self._pump()
        # A caller that goes away must not cancel the batch for everyone else.
        return await asyncio.shield(future)

    def _pump(self) -> None:
        while self._queue and self._in_flight < self.max_in_flight:
            batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            self._in_flight += 1
            self.batches += 1
            task = asyncio.ensure_future(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Item, asyncio.Future[Any]]]) -> None:
        try:
            outcomes = await self.send([item for item, _ in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} got {len(outcomes)} outcomes")
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear of it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            for (_, future), outcome in zip(batch, outcomes):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
        finally:
            self._in_flight -= 1
            self._pump()
