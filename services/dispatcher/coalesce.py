"""Group commit for single publishes.

Concurrent ``Publish`` calls are written together: each call joins a queue,
and up to ``flushes`` writers take whatever has gathered (at most
``max_batch``) and publish it as one batch — one preferences call per
(account, topic) and one transaction. An event arriving alone is written at
once (no timer, no added latency); under load, calls share round trips.
Every event keeps its own result, and stays atomic on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from belfry import errors, trace

from services.dispatcher.model import Event
from services.dispatcher.publish import Result

Publish = Callable[[Sequence[Event | errors.BelfryError], Sequence[str | None]], Awaitable[list[Result]]]


class Coalescer:
    """Batches concurrent single events into shared writes."""

    def __init__(self, publish: Publish, *, max_batch: int = 256, flushes: int = 1) -> None:
        self._publish = publish
        self._max_batch = max_batch
        self._flushes = flushes
        # Each waiting item with its caller's trace id: the writer task runs in the first caller's context.
        self._waiting: list[tuple[Event | errors.BelfryError, str | None, asyncio.Future[Result]]] = []
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: Event | errors.BelfryError) -> Result:
        """The result for ``item``, written together with whatever else is waiting."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, trace.current(), future))
        if self._running < self._flushes:
            self._running += 1
            task = asyncio.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                try:
                    results = await self._publish([item for item, _, _ in batch], [t for _, t, _ in batch])
                except errors.BelfryError as exc:  # backpressure or a dependency: every caller hears it
                    results = [exc] * len(batch)
                except Exception as exc:
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, _, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._running -= 1
