"""The mobile sender: one lease → the user's devices, through FCM (Android) or APNs (iOS)."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable
from typing import Protocol

import asyncpg
from belfry import channels, log
from belfry.message import Message
from belfry.queue import Drop, Lease, Outcome
from belfry.queue.sender import Result, fan_out, fold

from services.mobile import push, store
from services.mobile.push import Push

_LOG = log.get(__name__)
NOT_CONFIGURED = "not configured"


class Provider(Protocol):
    """FCM or APNs."""

    async def send(self, push: Push) -> Result:
        """Send one push."""


class MobileSender:
    """Handles "mobile" leases."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        android: Provider | None,
        ios: Provider | None,
        clock: Callable[[], float] = time.time,
        fanout: int = 4,
    ) -> None:
        self._pool = pool
        self._providers = {"android": android, "ios": ios}
        self._clock = clock
        self._fanout = fanout  # devices of one delivery pushed to at once

    async def handle(self, lease: Lease) -> Outcome:
        """Push to every device of the user (a badge update: to set their badge); dead tokens are deleted."""
        devices = await store.list_for_user(self._pool, lease.account_id, lease.user_id)
        if not devices:
            return Drop("no mobile device")
        expires = int(lease.expires_at.timestamp())
        ttl = max(0, expires - int(self._clock()))
        if lease.topic == channels.MOBILE_BADGE_TOPIC:
            count = await store.badge(self._pool, lease.account_id, lease.user_id, None)
            collapse = _collapse_id(f"{lease.user_id}\x00badge")

            def update(d: store.Device) -> Push:
                return push.badge_only(d.token, d.app_id, count, collapse, expires, ttl)

            return fold(await fan_out(devices, lambda d: self._send(d, update(d)), self._fanout))
        msg = Message.from_json(lease.payload)
        count = await store.badge(self._pool, lease.account_id, lease.user_id, lease.notification_id)
        collapse = _collapse_id(f"{msg.user_id}\x00{msg.topic}" if msg.items else msg.notification_id)

        def alert(d: store.Device) -> Push:
            return Push(
                token=d.token,
                app_id=d.app_id,
                title=msg.title,
                body=msg.body,
                url=msg.url,
                notification_id=msg.notification_id,
                topic=msg.topic,
                collapse_id=collapse,
                expires_at=expires,
                ttl_seconds=ttl,
                high_priority=msg.locked,
                badge=count,
            )

        return fold(await fan_out(devices, lambda d: self._send(d, alert(d)), self._fanout))

    async def _send(self, device: store.Device, push: Push) -> Result:
        provider = self._providers.get(device.platform)
        if provider is None:
            # Recorded as a failed delivery with this reason, so an operator sees what is missing.
            return Result("fail", NOT_CONFIGURED)
        result = await provider.send(push)
        if result.kind == "gone":
            await store.delete(self._pool, device.account_id, device.user_id, device.device_id)
            _LOG.info(
                "device token deleted",
                account_id=device.account_id,
                device_id=str(device.device_id),
                reason=result.reason,
            )
        return result


def _collapse_id(key: str) -> str:
    """A newer push with the same id replaces an undelivered one (both providers take 64 characters)."""
    return base64.urlsafe_b64encode(hashlib.sha256(key.encode()).digest()).decode()[:43]
