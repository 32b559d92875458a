"""The producer client library: publish events to the dispatcher safely and fast.

``Publisher(channel)`` wraps the dispatcher's three publish forms:

- ``publish(event)``: one event, one round trip;
- ``publish_batch(events)``: any number of events, sent in calls of at most
  1,000, one status per event back in input order;
- ``submit(event)``: one event, sent together with whatever other ``submit``
  calls are waiting (one ``PublishBatch`` per gathering, no timer: an event
  that arrives alone goes at once), its final status back; the way for many
  concurrent single-event producers to cost the dispatcher one call per
  gathering instead of one per event;
- ``stream(events)``: the bidirectional stream for high rates, at most
  ``window`` events unacknowledged at a time (backpressure: a slow dispatcher
  slows the producer instead of piling events up in memory), re-opened and
  resumed when it breaks.

Every form gives each event an idempotency key (when the producer left it
empty) and an occurrence time before the first attempt, so retries are safe:
a retried event is answered as a replay, never written twice. Calls that
fail with UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED are retried
with exponential backoff and full jitter, never sooner than the server's
RetryInfo hint; each call has a default deadline.

Open the channel once and keep it: with ``belfry.rpc.connect`` (the kit's
TLS settings and service token), or with :func:`connect` given your own
credentials. Both spread calls over every replica of the dispatcher the
target resolves to (``dns:///dispatcher.belfry.svc:50052``: one address per
ready pod of the headless Service) and ping idle connections (``belfry.balance``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from belfry import balance
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.dispatcher.v1 import dispatcher_pb2_grpc

T = TypeVar("T")

RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
)
_RETRYABLE_CODES = frozenset(c.value[0] for c in RETRYABLE)
MAX_BATCH = 1000


@dataclass(frozen=True)
class Retries:
    """How hard to try: attempts per event or call, and the backoff curve (seconds)."""

    attempts: int = 8
    base: float = 0.05
    cap: float = 10.0

    def delay(self, attempt: int, hint: float, rng: Callable[[], float]) -> float:
        """Full-jitter exponential backoff, never below the server's hint."""
        return max(hint, min(self.cap, self.base * 2**attempt) * rng())  # type: ignore[no-any-return]


def retry_hint(error: grpc.aio.AioRpcError) -> float:
    """The server's RetryInfo delay in seconds (0 when absent)."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        return 0.0
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delay: float = info.retry_delay.ToTimedelta().total_seconds()
            return delay
    return 0.0


def prepare(event: pb.Event) -> pb.Event:
    """A copy with an idempotency key and an occurrence time, so every retry is the same event."""
    ready = pb.Event()
    ready.CopyFrom(event)
    if not ready.idempotency_key:
        ready.idempotency_key = uuid.uuid4().hex
    if not ready.HasField("occurred_at"):
        ready.occurred_at.GetCurrentTime()
    return ready


def connect(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    *,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """A long-lived channel to the dispatcher, balanced over every replica ``target`` resolves to.

    ``credentials``: the producer's mutual TLS (``grpc.ssl_channel_credentials``
    with its certificate from the mesh CA); None for plaintext.
    """
    options = [*balance.CHANNEL_OPTIONS, ("grpc.max_receive_message_length", 16 * 1024 * 1024)]
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)


class Publisher:
    """Publishes events over one long-lived channel (open it with :func:`connect` or ``belfry.rpc.connect``)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        deadline: float = 10.0,
        retries: Retries = Retries(),
        window: int = 2000,
        rng: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        gatherings: int = 1,
    ) -> None:
        self._stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
        self.deadline = deadline
        self.retries = retries
        self.window = window
        self._rng = rng
        self._sleep = sleep
        # submit(): events waiting for a batch call, and the calls in flight (at most ``gatherings``).
        self.gatherings = max(1, gatherings)
        self._waiting: list[tuple[pb.Event, asyncio.Future[pb.EventStatus]]] = []
        self._senders: set[asyncio.Task[None]] = set()

    async def _call(self, attempt_call: Callable[[], Awaitable[T]]) -> T:
        """Run one RPC, retrying transient failures."""
        for attempt in range(self.retries.attempts):
            try:
                return await attempt_call()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or attempt == self.retries.attempts - 1:
                    raise
                await self._sleep(self.retries.delay(attempt, retry_hint(exc), self._rng))
        raise AssertionError("unreachable: the last attempt raises")

    async def publish(self, event: pb.Event) -> pb.PublishResponse:
        """Publish one event; answers its notification id (``replayed`` when it was seen before)."""
        request = pb.PublishRequest(event=prepare(event))
        response: pb.PublishResponse = await self._call(lambda: self._stub.Publish(request, timeout=self.deadline))
        return response

    async def publish_batch(self, events: Sequence[pb.Event]) -> list[pb.EventStatus]:
        """Publish many events; one final status per event, ``index`` its position in ``events``.

        Events refused for a transient reason (backpressure, a dependency
        down) are sent again, alone with the others so refused, after the
        longest hint the server gave.
        """
        ready = [prepare(e) for e in events]
        final: list[pb.EventStatus | None] = [None] * len(ready)
        todo = list(range(len(ready)))
        for attempt in range(self.retries.attempts):
            hint = 0.0
            again: list[int] = []
            for start in range(0, len(todo), MAX_BATCH):
                chunk = todo[start : start + MAX_BATCH]
                request = pb.PublishBatchRequest(events=[ready[i] for i in chunk])
                answer: pb.PublishBatchResponse = await self._call(
                    lambda r=request: self._stub.PublishBatch(r, timeout=self.deadline)  # type: ignore[misc]
                )
                for i, status in zip(chunk, answer.statuses, strict=True):
                    status.index = i
                    final[i] = status
                    if status.outcome == pb.OUTCOME_REJECTED and status.code in _RETRYABLE_CODES:
                        again.append(i)
                        hint = max(hint, status.retry_after.ToTimedelta().total_seconds())
            todo = again
            if not todo or attempt == self.retries.attempts - 1:
                break
            await self._sleep(self.retries.delay(attempt, hint, self._rng))
        return [s for s in final if s is not None]

    async def submit(self, event: pb.Event) -> pb.EventStatus:
        """Publish one event in a batch with the other submits waiting; its final status (as ``publish_batch``).

        Up to ``gatherings`` batch calls are in flight; while they are, new
        events wait and go together in the next one. A refused event gets its
        own status (``OUTCOME_REJECTED``, the code and message), not an
        exception; a call that fails for good raises for every event in it.
        A caller that stops waiting does not take its event back: it may
        still be published (its idempotency key makes a retry a replay).
        """
        done: asyncio.Future[pb.EventStatus] = asyncio.get_running_loop().create_future()
        self._waiting.append((event, done))
        if len(self._senders) < self.gatherings:
            sender = asyncio.create_task(self._send_waiting())
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        return await done

    async def _send_waiting(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            try:
                statuses = await self.publish_batch([event for event, _ in batch])
            except asyncio.CancelledError:
                for _, done in batch:
                    done.cancel()
                raise
            except Exception as exc:  # the caller of each event hears it
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for (_, done), status in zip(batch, statuses, strict=True):
                status.index = 0  # its position in the caller's one-event view
                if not done.done():
                    done.set_result(status)

    def stream(self, events: AsyncIterable[pb.Event]) -> AsyncIterator[tuple[pb.Event, pb.EventStatus]]:
        """Publish events as they come; yield (event, final status) as acknowledgements arrive.

        At most ``window`` events are unacknowledged at once. When the stream
        breaks with a transient error it is re-opened and every event not yet
        acknowledged is sent again (the idempotency keys make that safe);
        events refused for a transient reason are re-sent after their hint.
        """
        return _Stream(self, events).run()


class _Ended(Exception):
    """The server ended a stream cleanly while events were still unacknowledged."""


class _Stream:
    """One producer stream: its unacknowledged events survive re-opened calls."""

    def __init__(self, publisher: Publisher, events: AsyncIterable[pb.Event]) -> None:
        self._p = publisher
        self._source = aiter(events)
        self._pending: dict[int, tuple[pb.Event, int]] = {}  # sequence → (event, transient refusals)
        self._window = asyncio.Semaphore(publisher.window)
        self._seq = 0
        self._exhausted = False
        self._slot = False  # a window slot taken for the next event
        self._next: asyncio.Future[pb.Event] | None = None  # the producer's next event, in flight

    async def run(self) -> AsyncIterator[tuple[pb.Event, pb.EventStatus]]:
        """Open calls until every event has its final status."""
        breaks = 0
        while True:
            try:
                async for item in self._one_call():
                    yield item
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or breaks + 1 >= self._p.retries.attempts:
                    raise
                await self._p._sleep(self._p.retries.delay(breaks, retry_hint(exc), self._p._rng))
                breaks += 1
            except _Ended:
                # The server closed the call with events still unacknowledged (e.g. it shut down).
                if breaks + 1 >= self._p.retries.attempts:
                    raise grpc.RpcError("the dispatcher ended the stream with events unacknowledged") from None
                await self._p._sleep(self._p.retries.delay(breaks, 0.0, self._p._rng))
                breaks += 1

    async def _writer(self, call: Any, write: Callable[[int], Awaitable[None]], drained: asyncio.Event) -> None:
        """Send what the broken call left unacknowledged, then new events as the window allows."""
        for seq in sorted(self._pending):
            await write(seq)
        while not self._exhausted:
            # A cancelled writer (the call broke) must neither lose its window slot nor
            # cancel the producer's iterator mid-step: both carry over to the next call.
            if not self._slot:
                await self._window.acquire()
                self._slot = True
            if self._next is None:
                self._next = asyncio.ensure_future(anext(self._source))
            try:
                raw = await asyncio.shield(self._next)
            except StopAsyncIteration:
                self._exhausted = True
                self._next, self._slot = None, False
                self._window.release()
                break
            self._next, self._slot = None, False
            self._seq += 1
            self._pending[self._seq] = (prepare(raw), 0)
            await write(self._seq)
        if self._pending:
            await drained.wait()
        await call.done_writing()

    async def _one_call(self) -> AsyncIterator[tuple[pb.Event, pb.EventStatus]]:
        call = self._p._stub.PublishStream()
        lock = asyncio.Lock()
        drained = asyncio.Event()
        later: set[asyncio.Task[None]] = set()

        async def write(seq: int) -> None:
            async with lock:
                await call.write(pb.PublishStreamRequest(sequence=seq, event=self._pending[seq][0]))

        async def resend(seq: int, delay: float) -> None:
            await self._p._sleep(delay)
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await write(seq)

        sending = asyncio.create_task(self._writer(call, write, drained))
        try:
            async for ack in call:
                if ack.sequence not in self._pending:
                    continue
                event, tries = self._pending[ack.sequence]
                s = ack.status
                if (
                    s.outcome == pb.OUTCOME_REJECTED
                    and s.code in _RETRYABLE_CODES
                    and tries + 1 < self._p.retries.attempts
                ):
                    self._pending[ack.sequence] = (event, tries + 1)
                    hint = s.retry_after.ToTimedelta().total_seconds()
                    task = asyncio.create_task(resend(ack.sequence, self._p.retries.delay(tries, hint, self._p._rng)))
                    later.add(task)
                    task.add_done_callback(later.discard)
                    continue
                del self._pending[ack.sequence]
                self._window.release()
                if self._exhausted and not self._pending:
                    drained.set()
                yield event, s
            if self._pending or not self._exhausted:
                raise _Ended
            await sending
        finally:
            sending.cancel()
            for task in later:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await sending
