"""The web push sender: one lease → the user's subscribed browsers.

A user with a live app tab gets the notification from the gateway instead
(``Drop("live tab")``). Each subscription's push is encrypted (RFC 8291,
aes128gcm, a fresh ECDH key per message as the RFC requires; see ``ece``), carries the
cached VAPID header and goes through the SSRF guard, then out over the
process's one aiohttp session, whose resolver only knows the addresses the
guard approved (see ``client``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

import aiohttp
import asyncpg
from belfry import log, ssrf
from belfry.message import Message
from belfry.openlink import OpenSigner
from belfry.queue import Drop, Fail, Lease, Outcome
from belfry.queue.presence import has_live_tab
from belfry.queue.sender import Result, fan_out, fold

from services.webpush import ece, payload, store
from services.webpush.client import PinnedResolver
from services.webpush.vapid import Keyring, Vapid

_LOG = log.get(__name__)
_MAX_TTL = 28 * 86400
_MAX_BODY = 64 * 1024  # push services answer in a few hundred bytes at most


def classify(code: int, headers: Mapping[str, str], now: float) -> Result:  # noqa: PLR0911 - one per answer
    """Map a push service's answer (RFC 8030 and the services' documented codes) to a result."""
    if code in (200, 201, 202):
        return Result("sent")
    if code in (404, 410):
        return Result("gone", f"subscription expired or unsubscribed ({code})")
    if code in (429, 503):
        return Result("retry", f"push service busy ({code})", ssrf.retry_after_seconds(headers.get("retry-after"), now))
    if code == 413:
        return Result("fail", "payload too large for the push service (413)")
    if code in (401, 403):
        return Result("fail", f"push service refused our VAPID credentials ({code}); check the VAPID key and subject")
    if 300 <= code < 400:
        return Result("fail", f"push service answered a redirect ({code}); redirects are never followed")
    if code >= 500:
        return Result("retry", f"push service error ({code})")
    return Result("fail", f"push service rejected the push ({code})")


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read a short answer to the end so the connection is kept; a long one closes it instead."""
    if response.content.at_eof():
        return
    if len(await response.content.read(_MAX_BODY)) == _MAX_BODY or not response.content.at_eof():
        response.close()


class WebPushSender:
    """Handles "browser" leases."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        session: aiohttp.ClientSession,
        resolver: PinnedResolver,
        guard: ssrf.Guard,
        vapid: Vapid,
        default_ttl: int,
        clock: Callable[[], float] = time.time,
        fanout: int = 4,
        other_vapids: Sequence[Vapid] = (),
        opener: OpenSigner | None = None,
    ) -> None:
        self._pool = pool
        self._session = session
        self._resolver = resolver
        self._guard = guard
        self._vapids = Keyring(vapid, other_vapids)  # each subscription is signed with the key it was made with
        self._default_ttl = default_ttl
        self._clock = clock
        self._fanout = fanout  # browsers of one delivery pushed to at once
        self._opener = opener  # the push opens the gateway's /open (marks it read), then its URL; None: the URL

    async def handle(self, lease: Lease) -> Outcome:
        """Deliver one notification to every browser the user subscribed."""
        if await has_live_tab(self._pool, lease.account_id, lease.user_id):
            return Drop("live tab")
        subs = await store.list_for_user(self._pool, lease.account_id, lease.user_id)
        if not subs:
            return Drop("no push subscription")
        msg = Message.from_json(lease.payload)
        if self._opener is not None and msg.url:
            # Relative to the app: the service worker opens it on its own origin, the gateway's.
            opened = self._opener.url("", msg.account_id, msg.user_id, msg.notification_id, msg.url)
            msg = dataclasses.replace(msg, url=opened)
        try:
            data = payload.encode(msg)
        except ValueError as exc:  # a title or URL too long for any push: retrying cannot help
            return Fail(str(exc))
        ttl = self._ttl(lease.expires_at)
        headers = {
            "content-encoding": "aes128gcm",
            "content-type": "application/octet-stream",
            "ttl": str(ttl),
            "urgency": "high" if msg.locked else "normal",
            "topic": payload.topic_header(msg),
        }
        return fold(await fan_out(subs, lambda sub: self._push(sub, data, headers), self._fanout))

    def _ttl(self, expires_at: datetime) -> int:
        left = int(expires_at.timestamp() - self._clock())
        return max(0, min(left, self._default_ttl if self._default_ttl else _MAX_TTL, _MAX_TTL))

    async def deliver(
        self, endpoint: str, p256dh: str, auth: str, data: bytes, headers: dict[str, str], vapid_key: str = ""
    ) -> Result:
        """Check, encrypt, sign and POST one push (no database work): the hot path the benchmark measures.

        ``vapid_key``: the public key the subscription was made with ('' = the current one).
        """
        vapid = self._vapids.signer(vapid_key)
        if vapid is None:
            return Result(
                "fail",
                "the subscription is bound to a VAPID key this service no longer holds; "
                "keep it in BELFRY_VAPID_OTHER_KEYS until the browser subscribes again",
            )
        try:
            target = await self._guard.check(endpoint)
        except ssrf.Refused as exc:
            return Result("fail", f"endpoint refused: {exc.reason}")
        body = ece.encrypt(data, p256dh, auth)
        # The VAPID audience is the push service's origin, spelled as in the endpoint.
        origin = f"https://{target.host_header}"
        self._resolver.pin(target)
        try:
            # Rebuilt from the checked parts, so the client cannot read a different host out of the URL.
            async with self._session.post(
                target.checked_url,
                data=body,
                headers={**headers, "authorization": vapid.header(origin)},
                allow_redirects=False,
            ) as response:
                result = classify(response.status, response.headers, self._clock())
                await _drain(response)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Result("retry", f"push service unreachable: {exc!r}")
        return result

    async def _push(self, sub: store.Subscription, data: bytes, headers: dict[str, str]) -> Result:
        log_ = _LOG.bind(account_id=sub.account_id, subscription_id=str(sub.subscription_id))
        result = await self.deliver(sub.endpoint, sub.p256dh, sub.auth, data, headers, sub.vapid_key)
        if result.kind == "sent":
            await store.mark_success(self._pool, sub)
        elif result.kind == "gone":
            await store.delete(self._pool, sub.account_id, sub.user_id, sub.subscription_id)
            log_.info("push subscription deleted", reason=result.reason)
        elif "VAPID" in result.reason:
            log_.error("push service refused the VAPID authorization", reason=result.reason)
        elif result.kind == "fail":
            log_.warning("push failed", reason=result.reason)
        return result
