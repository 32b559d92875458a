"""The Deliverability gRPC servicer: the suppression list, a delivery's bounces and the branding, for super admins.

Protobuf stops here: requests are validated and turned into calls on
``services.email.store``. Every call is scoped to the account of the
caller's verified token, and the caller's standing (an active super admin)
is looked up in the directory on every call, as QueueAdmin does: the list
names other users' addresses and what their mail servers said, and the
branding speaks for the whole account. ``SetBranding`` drops the account's
entry from the sender's branding cache in this process at once.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import datetime

import asyncpg
import grpc
from belfry import rpc
from belfry.api.email.v1 import email_pb2 as pb
from belfry.api.email.v1 import email_pb2_grpc as pb_grpc
from belfry.auth import Caller, TokenVerifier
from belfry.config import TlsSettings
from belfry.errors import InvalidArgument, PermissionDenied
from belfry.preferences import Preferences
from belfry.queue.admin import Directory
from google.protobuf import timestamp_pb2

from services.email import branding, store

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Deliverability"].full_name
_MAX_PAGE = 1000
_MAX_ADDRESS = 320  # RFC 5321: 64 + 1 + 255


def _ts(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


class DeliverabilityServicer(pb_grpc.DeliverabilityServicer):
    """List and lift suppressions; read a delivery's bounces and complaints."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        verifier: TokenVerifier,
        directory: Directory,
        *,
        cache: branding.BrandingCache | None = None,
        from_domains: Collection[str] = (),
    ) -> None:
        self._pool = pool
        self._verifier = verifier
        self._directory = directory
        self._cache = cache
        self._from_domains = frozenset(from_domains)

    async def _admin(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
        """The caller, once the directory confirms an active super admin of the token's account."""
        caller = self._verifier.from_metadata(metadata)
        member = await self._directory.member(caller.account_id, caller.user_id)
        if member is None or not member.active:
            raise PermissionDenied(f"user {caller.user_id!r} is not an active user of account {caller.account_id!r}")
        if not member.super_admin:
            raise PermissionDenied(
                "the suppression list, bounce records and branding are for the account's super admins"
            )
        return caller

    async def ListSuppressions(  # noqa: N802 - method names come from the proto
        self, request: pb.ListSuppressionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSuppressionsResponse:
        """The caller account's suppressed addresses (optionally those containing ``search``), in address order."""
        caller = await self._admin(context.invocation_metadata())
        size = request.page_size or 100
        if not 1 <= size <= _MAX_PAGE:
            raise InvalidArgument(f"page_size must be between 1 and {_MAX_PAGE}", field="page_size")
        if len(request.search) > _MAX_ADDRESS:
            raise InvalidArgument(f"search is at most {_MAX_ADDRESS} characters", field="search")
        found = await store.list_suppressions(
            self._pool, caller.account_id, search=request.search, after_address=request.after_address, limit=size
        )
        return pb.ListSuppressionsResponse(
            suppressions=[
                pb.Suppression(
                    address=s.address,
                    reason=s.reason,
                    detail=s.detail,
                    source_delivery_id=s.source_delivery or 0,
                    first_seen=_ts(s.first_seen),
                    last_seen=_ts(s.last_seen),
                )
                for s in found
            ],
            next_after_address=found[-1].address if len(found) == size else "",
        )

    async def RemoveSuppressions(  # noqa: N802 - method names come from the proto
        self, request: pb.RemoveSuppressionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemoveSuppressionsResponse:
        """Lift the named suppressions; report the addresses that were not suppressed."""
        caller = await self._admin(context.invocation_metadata())
        addresses = list(dict.fromkeys(a.strip().lower() for a in request.addresses))
        if not 1 <= len(addresses) <= _MAX_PAGE:
            raise InvalidArgument(f"name between 1 and {_MAX_PAGE} addresses", field="addresses")
        if any(not a or len(a) > _MAX_ADDRESS for a in addresses):
            raise InvalidArgument(f"addresses are 1 to {_MAX_ADDRESS} characters", field="addresses")
        removed = await store.remove_suppressions(self._pool, caller.account_id, addresses)
        gone = set(removed)
        return pb.RemoveSuppressionsResponse(removed=removed, not_suppressed=[a for a in addresses if a not in gone])

    async def GetDeliveryFeedback(  # noqa: N802 - method names come from the proto
        self, request: pb.GetDeliveryFeedbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDeliveryFeedbackResponse:
        """The bounces and complaints received for one of the caller account's deliveries."""
        caller = await self._admin(context.invocation_metadata())
        if request.delivery_id <= 0:
            raise InvalidArgument("delivery_id is a positive integer", field="delivery_id")
        found = await store.feedback_of(self._pool, caller.account_id, request.delivery_id)
        return pb.GetDeliveryFeedbackResponse(
            feedback=[
                pb.Feedback(kind=f.kind, address=f.address, status=f.status, detail=f.detail, at=_ts(f.at))
                for f in found
            ]
        )

    async def GetBranding(  # noqa: N802 - method names come from the proto
        self, request: pb.GetBrandingRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetBrandingResponse:
        """The caller account's branding as set (empty fields: the defaults)."""
        caller = await self._admin(context.invocation_metadata())
        found = (await branding.load(self._pool, [caller.account_id])).get(caller.account_id, branding.DEFAULT)
        return pb.GetBrandingResponse(branding=_branding_pb(found))

    async def SetBranding(  # noqa: N802 - method names come from the proto
        self, request: pb.SetBrandingRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetBrandingResponse:
        """Check and store the caller account's branding; its next emails use it."""
        caller = await self._admin(context.invocation_metadata())
        given = branding.Branding(**{f: getattr(request.branding, f) for f in branding.FIELDS})
        checked = branding.check(given, self._from_domains)
        await branding.store(self._pool, caller.account_id, checked, caller.user_id)
        if self._cache is not None:
            self._cache.invalidate(caller.account_id)
        return pb.SetBrandingResponse(branding=_branding_pb(checked))


def _branding_pb(value: branding.Branding) -> pb.Branding:
    return pb.Branding(**{f: getattr(value, f) for f in branding.FIELDS})


class Deliverability:
    """The servicer and its own channel to the directory (close it at shutdown)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        verifier: TokenVerifier,
        preferences_address: str,
        tls: TlsSettings,
        *,
        branding: branding.BrandingCache | None = None,
        from_domains: Collection[str] = (),
    ) -> None:
        self._channel = rpc.connect(preferences_address, tls)
        self.servicer = DeliverabilityServicer(
            pool, verifier, Preferences(self._channel), cache=branding, from_domains=from_domains
        )

    def register(self, server: grpc.aio.Server) -> None:
        """The ``Built.registrations`` entry."""
        pb_grpc.add_DeliverabilityServicer_to_server(self.servicer, server)

    async def close(self) -> None:
        """Close the directory channel."""
        await self._channel.close()
