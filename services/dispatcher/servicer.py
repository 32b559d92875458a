"""Protobuf ↔ domain for the dispatcher's RPCs, and nothing else."""
# ruff: noqa: N802  # RPC method names come from the proto

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC

import asyncpg
import grpc
from belfry import errors, rpc, text
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.dispatcher.v1 import dispatcher_pb2_grpc
from google.protobuf import json_format

from services.dispatcher import status, status_store, store, validate, watch
from services.dispatcher.coalesce import Coalescer
from services.dispatcher.model import SOURCES, Accepted, Event, ObjectRef
from services.dispatcher.publish import Dispatcher, Result


class DispatcherServicer(dispatcher_pb2_grpc.DispatcherServiceServicer):
    """The producer API and the status API."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        pool: asyncpg.Pool,
        limits: validate.Limits,
        *,
        max_batch: int,
        writers: int = 1,
        watching: watch.Tuning | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self._pool = pool
        self._limits = limits
        self._max_batch = max_batch
        self._coalescer = Coalescer(dispatcher.publish, flushes=writers)
        self._watch = watch.Watch(pool, watching or watch.Tuning())

    def _event(self, message: pb.Event) -> Event | errors.BelfryError:
        """Convert and validate one event; an error is returned, not raised, so batches go on."""
        try:
            validate.check_size(message.ByteSize(), self._limits)
            now = self._dispatcher.clock()
            try:
                occurred = message.occurred_at.ToDatetime(tzinfo=UTC) if message.HasField("occurred_at") else now
            except (ValueError, OverflowError) as exc:
                raise errors.InvalidArgument(
                    f"event.occurred_at is not a valid time: {exc}", field="event.occurred_at"
                ) from exc
            # The body hash covers everything but the key: clear it for a moment (cheaper than a copy).
            key = message.idempotency_key
            message.ClearField("idempotency_key")
            encoded = message.SerializeToString(deterministic=True)
            body_hash = hashlib.sha256(encoded).digest()
            message.idempotency_key = key
            o = message.object
            event = Event(
                account_id=message.account_id,
                topic=message.topic,
                occurred_at=occurred,
                idempotency_key=message.idempotency_key,
                body_hash=body_hash,
                actor_user_id=message.actor.user_id,
                source=SOURCES[message.actor.source] if message.actor.source < len(SOURCES) else "",
                object=ObjectRef(o.type, o.id, o.display_name, o.url, o.owner_user_id),
                owner_user_ids=tuple(message.owner_user_ids),
                custom_property_user_ids=tuple(message.custom_property_user_ids),
                recipient_user_ids=tuple(message.recipient_user_ids),
                mentioned_user_ids=tuple(message.mentioned_user_ids),
                variables=json_format.MessageToDict(message.variables) if message.HasField("variables") else {},
                activity_id=message.activity_id,
                team_id=message.team_id,
                unassigned=message.unassigned,
                include_followers=message.include_followers,
            )
            validate.check(event, now, self._limits)
            # A NUL character is a zero byte in the encoding: only then is every text walked
            # (PostgreSQL cannot store it; the walk names the field).
            if b"\x00" in encoded or text.NUL in key:
                text.check_record(event, "event")
        except errors.BelfryError as exc:
            return exc
        return event

    async def Publish(self, request: pb.PublishRequest, context: grpc.aio.ServicerContext) -> pb.PublishResponse:
        """Publish one event; idempotent on (account, idempotency key) for 24 hours."""
        if not request.HasField("event"):
            raise errors.InvalidArgument("the request carries no event", field="event")
        result = await self._coalescer.submit(self._event(request.event))
        if isinstance(result, errors.BelfryError):
            raise result
        return pb.PublishResponse(notification_id=str(result.notification_id), replayed=result.replayed)

    async def PublishBatch(
        self, request: pb.PublishBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.PublishBatchResponse:
        """Publish up to 1,000 events; each is atomic on its own and gets its own status."""
        if len(request.events) > self._max_batch:
            raise errors.InvalidArgument(
                f"a batch holds at most {self._max_batch} events, got {len(request.events)}; split it", field="events"
            )
        results = await self._dispatcher.publish([self._event(e) for e in request.events])
        return pb.PublishBatchResponse(statuses=[_status(i, r) for i, r in enumerate(results)])

    async def PublishStream(
        self, requests: AsyncIterator[pb.PublishStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PublishStreamAck]:
        """Acknowledge every event; events that arrive together are written together."""
        inbox: asyncio.Queue[pb.PublishStreamRequest | None] = asyncio.Queue(maxsize=self._max_batch * 2)

        async def read() -> None:
            try:
                async for request in requests:
                    await inbox.put(request)
            finally:
                await inbox.put(None)

        reader = asyncio.create_task(read())
        try:
            ended = False
            while not ended:
                batch = [await inbox.get()]
                while len(batch) < self._max_batch and not inbox.empty():
                    batch.append(inbox.get_nowait())
                if batch[-1] is None:
                    ended = True
                    batch.pop()
                for ack in await self._acks([r for r in batch if r is not None]):
                    yield ack
            # What ended the reading ends the call: a message that could not be
            # parsed (the kit's INVALID_ARGUMENT) after every earlier one was acknowledged.
            await reader
        finally:
            reader.cancel()

    async def _acks(self, batch: list[pb.PublishStreamRequest]) -> list[pb.PublishStreamAck]:
        items = [self._event(r.event) for r in batch]
        if not items:
            return []
        try:
            results = await self._dispatcher.publish(items)
        except errors.BelfryError as exc:  # backpressure: every event of this turn is refused alike
            results = [exc] * len(items)
        return [
            pb.PublishStreamAck(sequence=r.sequence, status=_status(0, res))
            for r, res in zip(batch, results, strict=True)
        ]

    async def RecordInboxVisit(
        self, request: pb.RecordInboxVisitRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordInboxVisitResponse:
        """Record that a user visited the conversations inbox (the first visit is kept)."""
        _require(account_id=request.account_id, user_id=request.user_id)
        when = await store.record_visit(self._pool, request.account_id, request.user_id)
        response = pb.RecordInboxVisitResponse()
        response.first_visited_at.FromDatetime(when)
        return response

    async def GetNotification(
        self, request: pb.GetNotificationRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetNotificationResponse:
        """One notification's timeline per recipient and channel."""
        _require(account_id=request.account_id, notification_id=request.notification_id)
        nid = _uuid(request.notification_id, "notification_id")
        record = await status_store.get_notification(self._pool, request.account_id, nid)
        if record is None:
            raise errors.NotFound(
                f"no notification {request.notification_id} in account {request.account_id!r}", field="notification_id"
            )
        return pb.GetNotificationResponse(notification=status.to_proto(record))

    async def ListNotifications(
        self, request: pb.ListNotificationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListNotificationsResponse:
        """A user's notifications, newest first, paged."""
        _require(account_id=request.account_id, user_id=request.user_id)
        size = request.page.page_size or 50
        if not 0 < size <= 500:
            raise errors.InvalidArgument("page.page_size must be between 1 and 500", field="page.page_size")
        cursor = status.decode_token(request.page.page_token) if request.page.page_token else None
        keys = await status_store.list_for_user(
            self._pool, request.account_id, request.user_id, before=cursor, limit=size + 1
        )
        page = keys[:size]
        records = await status_store.load_notifications(
            self._pool, request.account_id, [k[1] for k in page], user_id=request.user_id
        )
        return pb.ListNotificationsResponse(
            notifications=[status.to_proto(r) for r in records],
            next_page_token=status.encode_token(page[-1]) if len(keys) > size else "",
        )

    async def WatchStatus(
        self, request: pb.WatchStatusRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchStatusResponse]:
        """The account's status changes as they happen, from the resume point on, at least once."""
        _require(account_id=request.account_id)
        since = watch.decode_token(request.resume_token) if request.resume_token else None
        async for changes, position in self._watch.follow(request.account_id, since):
            yield pb.WatchStatusResponse(
                changes=[status.change(c) for c in changes], resume_token=watch.encode_token(position)
            )


def _require(**fields: str) -> None:
    for name, value in fields.items():
        if not value:
            raise errors.InvalidArgument(f"{name} is required", field=name)


def _uuid(text: str, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError as exc:
        raise errors.InvalidArgument(f"{field} {text!r} is not a notification id (a UUID)", field=field) from exc


def _status(index: int, result: Result) -> pb.EventStatus:
    """The per-event answer of a batch or a stream."""
    if isinstance(result, Accepted):
        return pb.EventStatus(
            index=index,
            outcome=pb.OUTCOME_REPLAYED if result.replayed else pb.OUTCOME_ACCEPTED,
            notification_id=str(result.notification_id),
        )
    answer = pb.EventStatus(
        index=index,
        outcome=pb.OUTCOME_REJECTED,
        code=rpc.status_code_of(result).value[0],
        message=result.message,
        field=result.field or "",
    )
    if result.retry_after is not None:
        answer.retry_after.FromNanoseconds(int(result.retry_after * 1e9))
    return answer
