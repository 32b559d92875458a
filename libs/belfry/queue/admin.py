"""The QueueAdmin gRPC servicer every sender service registers.

Protobuf stops here: requests are validated and turned into calls on
``belfry.queue.ops``; every call is scoped to the account named by the
caller's verified token, so an account sees and requeues only its own
dead letters. Dead letters name other users, their topics and the errors
their deliveries met: only the account's **super admins** may list, requeue
or count them, and that standing is looked up in the directory (the
preferences service) on every call, never read from the token.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Protocol

import asyncpg
import grpc
from google.protobuf import timestamp_pb2

from belfry import rpc
from belfry.api.queue.v1 import queue_pb2 as pb
from belfry.api.queue.v1 import queue_pb2_grpc as pb_grpc
from belfry.auth import Caller, TokenVerifier
from belfry.config import TlsSettings
from belfry.errors import InvalidArgument, PermissionDenied
from belfry.preferences import Member, Preferences
from belfry.queue import ops
from belfry.queue.store import CHANNELS

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["QueueAdmin"].full_name
_MAX_PAGE = 1000


def _ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _error(entry: dict[str, object]) -> pb.DeliveryError:
    at = entry.get("at")
    out = pb.DeliveryError(
        attempt=int(str(entry.get("attempt") or 0)),
        error=str(entry.get("error") or ""),
        worker=str(entry.get("worker") or ""),
        requeued_by=str(entry.get("requeued_by") or ""),
    )
    if isinstance(at, str):
        out.at.FromDatetime(datetime.fromisoformat(at))
    return out


class Directory(Protocol):
    """Where a user's standing is looked up (``belfry.preferences.Preferences``)."""

    async def member(self, account_id: str, user_id: str) -> Member | None:
        """The user's standing in the account; None when not a user of it."""


class QueueAdminServicer(pb_grpc.QueueAdminServicer):
    """Dead letters, requeue and statistics over gRPC, for the account's super admins."""

    def __init__(self, pool: asyncpg.Pool, verifier: TokenVerifier, directory: Directory) -> None:
        self._pool = pool
        self._verifier = verifier
        self._directory = directory

    async def _admin(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
        """The caller, once the directory confirms an active super admin of the token's account."""
        caller = self._verifier.from_metadata(metadata)
        member = await self._directory.member(caller.account_id, caller.user_id)
        if member is None or not member.active:
            raise PermissionDenied(f"user {caller.user_id!r} is not an active user of account {caller.account_id!r}")
        if not member.super_admin:
            raise PermissionDenied("dead letters, requeues and queue statistics are for the account's super admins")
        return caller

    async def ListDeadLetters(  # noqa: N802 - method names come from the proto
        self, request: pb.ListDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDeadLettersResponse:
        """The caller account's dead letters, each with its error history, in id order."""
        caller = await self._admin(context.invocation_metadata())
        if request.channel and request.channel not in CHANNELS:
            raise InvalidArgument(f"channel must be one of {', '.join(CHANNELS)}", field="channel")
        if request.after_delivery_id < 0:
            raise InvalidArgument("after_delivery_id cannot be negative", field="after_delivery_id")
        size = request.page_size or 100
        if not 1 <= size <= _MAX_PAGE:
            raise InvalidArgument(f"page_size must be between 1 and {_MAX_PAGE}", field="page_size")
        dead = await ops.list_dead(
            self._pool, caller.account_id, channel=request.channel, after_id=request.after_delivery_id, limit=size
        )
        return pb.ListDeadLettersResponse(
            dead_letters=[
                pb.DeadLetter(
                    delivery_id=d.delivery_id,
                    notification_id=str(d.notification_id),
                    user_id=d.user_id,
                    channel=d.channel,
                    topic=d.topic,
                    attempts=d.attempts,
                    errors=[_error(e) for e in d.errors],
                    created_at=_ts(d.created_at),
                    finished_at=_ts(d.finished_at),
                )
                for d in dead
            ],
            next_after_delivery_id=dead[-1].delivery_id if len(dead) == size else 0,
        )

    async def Requeue(self, request: pb.RequeueRequest, context: grpc.aio.ServicerContext) -> pb.RequeueResponse:  # noqa: N802 - method names come from the proto
        """Give the named dead letters a fresh attempt budget; report the ids that were not dead."""
        caller = await self._admin(context.invocation_metadata())
        ids = list(dict.fromkeys(request.delivery_ids))
        if not 1 <= len(ids) <= _MAX_PAGE:
            raise InvalidArgument(f"name between 1 and {_MAX_PAGE} delivery ids", field="delivery_ids")
        if any(i <= 0 for i in ids):
            raise InvalidArgument("delivery ids are positive integers", field="delivery_ids")
        done = await ops.requeue(self._pool, caller.account_id, ids, by=caller.user_id)
        requeued = set(done)
        return pb.RequeueResponse(requeued=done, not_dead=[i for i in ids if i not in requeued])

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.GetStatsResponse:  # noqa: N802 - method names come from the proto
        """The caller account's deliveries by channel and state, and the oldest due one's wait."""
        caller = await self._admin(context.invocation_metadata())
        found = await ops.stats(self._pool, caller.account_id)
        return pb.GetStatsResponse(
            channels=[
                pb.ChannelStats(channel=s.channel, counts=s.counts, oldest_due_seconds=s.oldest_due_seconds)
                for s in found
            ]
        )


class QueueAdmin:
    """A sender's QueueAdmin: the servicer and its own channel to the directory (close it at shutdown)."""

    def __init__(self, pool: asyncpg.Pool, verifier: TokenVerifier, preferences_address: str, tls: TlsSettings) -> None:
        self._channel = rpc.connect(preferences_address, tls)
        self.servicer = QueueAdminServicer(pool, verifier, Preferences(self._channel))
        self.registration = registration(self.servicer)

    async def close(self) -> None:
        """Close the directory channel."""
        await self._channel.close()


def registration(servicer: QueueAdminServicer) -> rpc.Registration:
    """The ``Built.registrations`` entry for a sender service."""

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_QueueAdminServicer_to_server(servicer, server)

    return register
