"""The Deliverability gRPC servicer: the suppression list (and its import), a delivery's bounces and the branding,
for super admins.

Protobuf stops here: requests are validated and turned into calls on
``services.email.store``. Every call is scoped to the account of the
caller's verified token, and the caller's standing (an active super admin)
is looked up in the directory on every call, as QueueAdmin does: the list
names other users' addresses and what their mail servers said, and the
branding speaks for the whole account. ``SetBranding`` drops the account's
entry from the sender's branding cache in this process at once.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from datetime import datetime, timedelta

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

from services.email import branding, headers, store

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Deliverability"].full_name
_MAX_PAGE = 1000
_MAX_ADDRESS = 320  # RFC 5321: 64 + 1 + 255
_MAX_IMPORT = 1000  # entries per ImportSuppressions call: one statement, a bounded request
_MAX_DETAIL = 1000
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


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
        soft_expiry_seconds: float = 7 * 86400.0,
    ) -> None:
        self._pool = pool
        self._verifier = verifier
        self._directory = directory
        self._cache = cache
        self._from_domains = frozenset(from_domains)
        self._soft_expiry = soft_expiry_seconds

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
            self._pool,
            caller.account_id,
            search=request.search,
            after_address=request.after_address,
            limit=size,
            soft_expiry_seconds=self._soft_expiry,
        )
        lapse = timedelta(seconds=self._soft_expiry)
        return pb.ListSuppressionsResponse(
            suppressions=[
                pb.Suppression(
                    address=s.address,
                    reason=s.reason,
                    detail=s.detail,
                    source_delivery_id=s.source_delivery or 0,
                    first_seen=_ts(s.first_seen),
                    last_seen=_ts(s.last_seen),
                    expires_at=_ts(s.last_seen + lapse) if s.reason == store.SOFT_BOUNCES else None,
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

    async def ImportSuppressions(  # noqa: N802 - method names come from the proto
        self, request: pb.ImportSuppressionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ImportSuppressionsResponse:
        """Suppress the entries of an existing list that pass the checks; name each refused one and why."""
        caller = await self._admin(context.invocation_metadata())
        if not 1 <= len(request.entries) <= _MAX_IMPORT:
            raise InvalidArgument(
                f"import between 1 and {_MAX_IMPORT} entries per call, got {len(request.entries)}: "
                f"split the list into calls of at most {_MAX_IMPORT} (importing an entry again changes nothing)",
                field="entries",
            )
        accepted, refused = checked_imports(request.entries, f"imported by {caller.user_id}")
        done = await store.import_suppressions(
            self._pool, caller.account_id, accepted, soft_expiry_seconds=self._soft_expiry
        )
        return pb.ImportSuppressionsResponse(
            added=done.added,
            updated=done.updated,
            unchanged=done.unchanged,
            refused=[pb.ImportRefusal(index=i, address=a, why=why) for i, a, why in refused],
        )

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


def checked_imports(
    entries: Iterable[pb.SuppressionImport], imported_by: str
) -> tuple[list[tuple[str, str, str]], list[tuple[int, str, str]]]:
    """The entries to store as ``(address, reason, detail)``, and the refused ones as ``(index, address, why)``.

    An address is held to the sender's own rule (one plain ``local@domain``
    mailbox; surrounding spaces are dropped, nothing else is repaired) and
    lower-cased as the list keys it; a second entry for one address is
    refused, naming the first.
    """
    accepted: list[tuple[str, str, str]] = []
    refused: list[tuple[int, str, str]] = []
    first: dict[str, int] = {}
    for index, entry in enumerate(entries):
        address = entry.address.strip().lower()
        why = ""
        if not address:
            why = "address is empty"
        elif headers.recipient(address) is None:
            why = "not one plain local@domain mailbox (at most 254 characters, a dotted domain, no display name)"
        elif entry.reason not in store.REASONS:
            why = f"reason must be one of {', '.join(repr(r) for r in store.REASONS)}, got {entry.reason!r}"
        elif len(entry.detail) > _MAX_DETAIL:
            why = f"detail is at most {_MAX_DETAIL} characters"
        elif _CONTROL.search(entry.detail):
            why = "detail is one line of text (no control characters)"
        elif address in first:
            why = f"the same address as entry {first[address]}"
        if why:
            refused.append((index, entry.address, why))
            continue
        first[address] = index
        detail = f"{imported_by}: {entry.detail}" if entry.detail else imported_by
        accepted.append((address, entry.reason, detail))
    return accepted, refused


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
        soft_expiry_seconds: float = 7 * 86400.0,
    ) -> None:
        self._channel = rpc.connect(preferences_address, tls)
        self.servicer = DeliverabilityServicer(
            pool,
            verifier,
            Preferences(self._channel),
            cache=branding,
            from_domains=from_domains,
            soft_expiry_seconds=soft_expiry_seconds,
        )

    def register(self, server: grpc.aio.Server) -> None:
        """The ``Built.registrations`` entry."""
        pb_grpc.add_DeliverabilityServicer_to_server(self.servicer, server)

    async def close(self) -> None:
        """Close the directory channel."""
        await self._channel.close()
