"""The WebPush gRPC servicer: protobuf ↔ dataclasses, nothing else."""

from __future__ import annotations

import base64
import binascii
import uuid

import asyncpg
import grpc
from belfry import ssrf
from belfry.api.webpush.v1 import webpush_pb2 as pb
from belfry.api.webpush.v1 import webpush_pb2_grpc as pb_grpc
from belfry.auth import TokenVerifier
from belfry.errors import InvalidArgument, NotFound
from cryptography.hazmat.primitives.asymmetric import ec

from services.webpush import store

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["WebPush"].full_name
_MAX_LABEL = 200
_MAX_ENDPOINT = 2048


def _b64(value: str, field: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument(f"{field} must be base64url", field=field) from exc


def _subscription(sub: store.Subscription) -> pb.Subscription:
    out = pb.Subscription(subscription_id=str(sub.subscription_id), endpoint=sub.endpoint, label=sub.label)
    out.created_at.FromDatetime(sub.created_at)
    if sub.last_success_at is not None:
        out.last_success_at.FromDatetime(sub.last_success_at)
    return out


class WebPushServicer(pb_grpc.WebPushServicer):
    """Browser subscriptions of the calling user."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        verifier: TokenVerifier,
        guard: ssrf.Guard,
        public_key: str,
        *,
        max_per_user: int = store.DEFAULT_MAX_PER_USER,
        held: frozenset[str] = frozenset(),
    ) -> None:
        self._pool = pool
        self._verifier = verifier
        self._guard = guard
        self._public_key = public_key
        self._max_per_user = max_per_user
        self._held = held | {public_key}  # VAPID public keys this service signs with (rotation)

    async def GetVapidPublicKey(  # noqa: N802 - method names come from the proto
        self, request: pb.GetVapidPublicKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetVapidPublicKeyResponse:
        """The application server key for ``pushManager.subscribe``."""
        return pb.GetVapidPublicKeyResponse(public_key=self._public_key)

    async def RegisterSubscription(  # noqa: N802 - method names come from the proto
        self, request: pb.RegisterSubscriptionRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterSubscriptionResponse:
        """Validate the PushSubscription (keys, endpoint guard) and store it for the caller (within the cap).

        An endpoint another user of the account registered stays theirs: ALREADY_EXISTS.
        """
        caller = self._verifier.from_metadata(context.invocation_metadata())
        if not request.endpoint or len(request.endpoint) > _MAX_ENDPOINT:
            raise InvalidArgument(f"endpoint is required (at most {_MAX_ENDPOINT} characters)", field="endpoint")
        point = _b64(request.p256dh, "p256dh")
        try:
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        except ValueError as exc:
            raise InvalidArgument(
                "p256dh must be the subscription's P-256 public key (65 bytes, uncompressed)", field="p256dh"
            ) from exc
        if len(_b64(request.auth, "auth")) != 16:
            raise InvalidArgument("auth must be the subscription's 16-byte secret", field="auth")
        if len(request.label) > _MAX_LABEL:
            raise InvalidArgument(f"label must be at most {_MAX_LABEL} characters", field="label")
        vapid_key = request.application_server_key.rstrip("=") or self._public_key
        if vapid_key not in self._held:
            raise InvalidArgument(
                "application_server_key is not a VAPID key of this service; subscribe again with "
                "the key from GetVapidPublicKey",
                field="application_server_key",
            )
        try:
            await self._guard.check(request.endpoint)
        except ssrf.Refused as exc:
            raise InvalidArgument(f"endpoint refused: {exc.reason}", field="endpoint") from exc
        sub = await store.upsert(
            self._pool,
            caller.account_id,
            caller.user_id,
            request.endpoint,
            request.p256dh,
            request.auth,
            request.label,
            max_per_user=self._max_per_user,
            vapid_key=vapid_key,
        )
        return pb.RegisterSubscriptionResponse(subscription=_subscription(sub))

    async def ListSubscriptions(  # noqa: N802 - method names come from the proto
        self, request: pb.ListSubscriptionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSubscriptionsResponse:
        """The caller's subscriptions, newest first."""
        caller = self._verifier.from_metadata(context.invocation_metadata())
        subs = await store.list_for_user(self._pool, caller.account_id, caller.user_id)
        return pb.ListSubscriptionsResponse(subscriptions=[_subscription(s) for s in subs])

    async def DeleteSubscription(  # noqa: N802 - method names come from the proto
        self, request: pb.DeleteSubscriptionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteSubscriptionResponse:
        """Forget one of the caller's subscriptions."""
        caller = self._verifier.from_metadata(context.invocation_metadata())
        try:
            sub_id = uuid.UUID(request.subscription_id)
        except ValueError as exc:
            raise InvalidArgument("subscription_id must be a UUID", field="subscription_id") from exc
        if not await store.delete(self._pool, caller.account_id, caller.user_id, sub_id):
            raise NotFound(f"no subscription {sub_id} for this user")
        return pb.DeleteSubscriptionResponse()
