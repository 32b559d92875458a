"""The other-apps sender: one lease → a signed POST to each of the user's active webhooks."""

from __future__ import annotations

import time
from collections.abc import Callable

import asyncpg
import httpx
from belfry import log, ssrf
from belfry.message import Message
from belfry.queue import Drop, Lease, Outcome
from belfry.queue.sender import Result, fan_out, fold
from cryptography.exceptions import InvalidTag

from services.webhooks import body, store
from services.webhooks.signing import SecretBox, signature

_LOG = log.get(__name__)
_USER_AGENT = "Belfry-Webhooks/1"


def classify(response: httpx.Response, now: float) -> Result:
    """2xx sent; 410 gone (disable); 429 and 5xx retry (Retry-After honoured); the rest permanent."""
    code = response.status_code
    if 200 <= code < 300:
        return Result("sent")
    if code == 410:
        return Result("gone", "endpoint answered 410 Gone; webhook disabled")
    if code == 429 or code >= 500:
        return Result(
            "retry", f"endpoint answered {code}", ssrf.retry_after_seconds(response.headers.get("retry-after"), now)
        )
    if 300 <= code < 400:
        return Result("fail", f"endpoint answered a redirect ({code}); redirects are never followed")
    return Result("fail", f"endpoint rejected the delivery ({code})")


class WebhookSender:
    """Handles "other_apps" leases."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        client: httpx.AsyncClient,
        guard: ssrf.Guard,
        box: SecretBox,
        clock: Callable[[], float] = time.time,
        fanout: int = 4,
    ) -> None:
        self._pool = pool
        self._client = client
        self._guard = guard
        self._box = box
        self._clock = clock
        self._fanout = fanout  # webhooks of one delivery posted to at once

    async def handle(self, lease: Lease) -> Outcome:
        """POST the notification to every active webhook of the user."""
        hooks = await store.list_for_user(self._pool, lease.account_id, lease.user_id, active_only=True)
        if not hooks:
            return Drop("no webhook connected")
        msg = Message.from_json(lease.payload)
        return fold(await fan_out(hooks, lambda hook: self._post(hook, msg, lease.delivery_id), self._fanout))

    async def _post(self, hook: store.Webhook, msg: Message, delivery_id: int) -> Result:
        log_ = _LOG.bind(account_id=hook.account_id, webhook_id=str(hook.webhook_id))
        try:
            target = await self._guard.check(hook.url)
        except ssrf.Refused as exc:
            log_.warning("webhook refused at send time", reason=exc.reason)
            return Result("fail", f"endpoint refused: {exc.reason}")
        content = body.encode(body.slack(msg) if hook.slack else body.generic(msg, delivery_id))
        try:
            secret = self._box.open(hook.secret_ciphertext, hook.account_id, str(hook.webhook_id))
        except InvalidTag:
            log_.error("webhook secret does not open: was BELFRY_WEBHOOK_SECRET_KEY changed?")
            return Result("fail", "signing secret cannot be decrypted with the configured key")
        timestamp = int(self._clock())
        headers = {
            "content-type": "application/json; charset=utf-8",
            "user-agent": _USER_AGENT,
            "x-belfry-timestamp": str(timestamp),
            "x-belfry-signature": signature(secret, timestamp, content),
            "x-belfry-webhook-id": str(hook.webhook_id),
            # Receivers deduplicate retries by this id (delivery is at least once).
            "x-belfry-delivery-id": str(delivery_id),
        }
        try:
            response = await self._guard.send(self._client, target, content=content, headers=headers)
        except httpx.HTTPError as exc:
            return Result("retry", f"endpoint unreachable: {exc!r}")
        result = classify(response, self._clock())
        if result.kind == "gone":
            await store.disable(self._pool, hook, result.reason)
            log_.info("webhook disabled", reason=result.reason)
        return result
