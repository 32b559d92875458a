"""The web push sender: one lease → the user's subscribed browsers.

A user with a live app tab gets the notification from the gateway instead
(``Drop("live tab")``). Each subscription's push is encrypted (RFC 8291,
aes128gcm, a fresh ECDH key per message as the RFC requires), carries the
cached VAPID header and goes through the SSRF guard, pinned to the address
the guard resolved.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

import asyncpg
import httpx
from belfry import log, metrics, ssrf
from belfry.message import Message
from belfry.queue import Drop, Fail, Lease, Outcome, Retry, Sent
from belfry.queue.presence import has_live_tab
from pywebpush import WebPusher

from services.webpush import payload, store
from services.webpush.vapid import Vapid

_LOG = log.get(__name__)
_MAX_TTL = 28 * 86400


@dataclass(frozen=True)
class Result:
    """What happened to one subscription's push."""

    kind: str  # "sent" | "retry" | "fail" | "gone"
    reason: str = ""
    retry_after: float | None = None


def classify(response: httpx.Response, now: float) -> Result:  # noqa: PLR0911 - one return per documented answer
    """Map a push service's answer (RFC 8030 and the services' documented codes) to a result."""
    code = response.status_code
    if code in (200, 201, 202):
        return Result("sent")
    if code in (404, 410):
        return Result("gone", f"subscription expired or unsubscribed ({code})")
    if code in (429, 503):
        return Result(
            "retry", f"push service busy ({code})", ssrf.retry_after_seconds(response.headers.get("retry-after"), now)
        )
    if code == 413:
        return Result("fail", "payload too large for the push service (413)")
    if code in (401, 403):
        return Result("fail", f"push service refused our VAPID credentials ({code}); check the VAPID key and subject")
    if 300 <= code < 400:
        return Result("fail", f"push service answered a redirect ({code}); redirects are never followed")
    if code >= 500:
        return Result("retry", f"push service error ({code})")
    return Result("fail", f"push service rejected the push ({code})")


class WebPushSender:
    """Handles "browser" leases."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        client: httpx.AsyncClient,
        guard: ssrf.Guard,
        vapid: Vapid,
        default_ttl: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pool = pool
        self._client = client
        self._guard = guard
        self._vapid = vapid
        self._default_ttl = default_ttl
        self._clock = clock

    async def handle(self, lease: Lease) -> Outcome:
        """Deliver one notification to every browser the user subscribed."""
        if await has_live_tab(self._pool, lease.account_id, lease.user_id):
            metrics.DELIVERIES.labels("browser", "dropped").inc()
            return Drop("live tab")
        subs = await store.list_for_user(self._pool, lease.account_id, lease.user_id)
        if not subs:
            metrics.DELIVERIES.labels("browser", "dropped").inc()
            return Drop("no push subscription")
        msg = Message.from_json(lease.payload)
        data = payload.encode(msg)
        ttl = self._ttl(lease.expires_at)
        headers = {
            "content-encoding": "aes128gcm",
            "content-type": "application/octet-stream",
            "ttl": str(ttl),
            "urgency": "high" if msg.locked else "normal",
            "topic": payload.topic_header(msg),
        }
        results = await asyncio.gather(*(self._push(sub, data, headers) for sub in subs))
        return self._outcome(results)

    def _ttl(self, expires_at: datetime) -> int:
        left = int(expires_at.timestamp() - self._clock())
        return max(0, min(left, self._default_ttl if self._default_ttl else _MAX_TTL, _MAX_TTL))

    async def _push(self, sub: store.Subscription, data: bytes, headers: dict[str, str]) -> Result:
        log_ = _LOG.bind(account_id=sub.account_id, subscription_id=str(sub.subscription_id))
        try:
            target = await self._guard.check(sub.endpoint)
        except ssrf.Refused as exc:
            log_.warning("push endpoint refused at send time", reason=exc.reason)
            return Result("fail", f"endpoint refused: {exc.reason}")
        info = {"endpoint": sub.endpoint, "keys": {"p256dh": sub.p256dh, "auth": sub.auth}}
        body = WebPusher(info).encode(data, "aes128gcm")["body"]
        parts = urlsplit(sub.endpoint)
        origin = f"{parts.scheme}://{parts.netloc}"
        try:
            response = await self._guard.send(
                self._client,
                target,
                content=body,
                headers={**headers, "authorization": self._vapid.header(origin)},
            )
        except httpx.HTTPError as exc:
            return Result("retry", f"push service unreachable: {exc!r}")
        result = classify(response, self._clock())
        if result.kind == "sent":
            await store.mark_success(self._pool, sub)
        elif result.kind == "gone":
            await store.delete(self._pool, sub.account_id, sub.user_id, sub.subscription_id)
            log_.info("push subscription deleted", reason=result.reason)
        elif response.status_code in (401, 403):
            log_.error("push service refused the VAPID authorization", status=response.status_code)
        return result

    @staticmethod
    def _outcome(results: list[Result]) -> Outcome:
        # One browser reached is a delivered notification; the tag stops a retry from showing it twice,
        # but retrying all of them for one slow browser would ring the others again.
        if any(r.kind == "sent" for r in results):
            metrics.DELIVERIES.labels("browser", "sent").inc()
            return Sent()
        retries = [r for r in results if r.kind == "retry"]
        if retries:
            metrics.DELIVERIES.labels("browser", "retried").inc()
            delays = [r.retry_after for r in retries if r.retry_after is not None]
            return Retry("; ".join(r.reason for r in retries), max(delays) if delays else None)
        metrics.DELIVERIES.labels("browser", "failed").inc()
        return Fail("; ".join(r.reason for r in results))
