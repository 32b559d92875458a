"""APNs over HTTP/2 with token-based (JWT ES256) provider authentication.

Apple refuses provider tokens older than an hour and throttles ones renewed
more often than every 20 minutes, so the JWT is reused for 40 minutes; an
``ExpiredProviderToken`` answer renews it once for the same push.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
import jwt
from belfry import ssrf
from belfry.queue.sender import Result

from services.mobile.push import Push
from services.mobile.settings import ApnsSettings

TOKEN_REUSE_SECONDS = 40 * 60
MAX_PAYLOAD = 4096
_GONE = {"BadDeviceToken", "Unregistered", "DeviceTokenNotForTopic"}


def classify(response: httpx.Response, now: float) -> Result:
    """APNs status and ``reason`` → a result."""
    if response.status_code == 200:
        return Result("sent")
    try:
        reason = str(response.json().get("reason", ""))
    except ValueError:
        reason = ""
    label = f"APNs {response.status_code} {reason}".strip()
    if response.status_code == 410 or reason in _GONE:
        return Result("gone", label)
    if response.status_code == 429 or response.status_code >= 500 or reason == "ExpiredProviderToken":
        # A token refused right after renewal means a skewed clock or a revoked key: retry later, loudly.
        return Result("retry", label, ssrf.retry_after_seconds(response.headers.get("retry-after"), now))
    return Result("fail", label)


def _reason(response: httpx.Response) -> str:
    try:
        return str(response.json().get("reason", ""))
    except ValueError:
        return ""


class Apns:
    """Sends to iOS devices."""

    def __init__(self, settings: ApnsSettings, client: httpx.AsyncClient, *, clock: Callable[[], float] = time.time):
        self._settings = settings
        self._client = client
        self._clock = clock
        self._jwt: tuple[str, float] | None = None

    def _provider_token(self, *, renew: bool = False) -> str:
        now = self._clock()
        if not renew and self._jwt is not None and now - self._jwt[1] < TOKEN_REUSE_SECONDS:
            return self._jwt[0]
        token = jwt.encode(
            {"iss": self._settings.team_id, "iat": int(now)},
            self._settings.key_pem,
            algorithm="ES256",
            headers={"kid": self._settings.key_id},
        )
        self._jwt = (token, now)
        return token

    def _payload(self, push: Push) -> bytes:
        if not push.title:  # a badge update: the icon's count, nothing shown, nothing played
            return json.dumps({"aps": {"badge": push.badge}}, separators=(",", ":")).encode()

        def document(body: str) -> bytes:
            aps = {
                "alert": {"title": push.title, "body": body},
                "sound": "default",
                "thread-id": push.topic,
                "badge": push.badge,
            }
            doc = {"aps": aps, "url": push.url, "notification_id": push.notification_id}
            return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()

        data = document(push.body)
        body = push.body
        while len(data) > MAX_PAYLOAD and body:  # APNs refuses more than 4 KB: shorten the body, never the ids
            body = body[: max(0, len(body) - max(1, (len(data) - MAX_PAYLOAD))) - 1]
            data = document(body + "…")
        return data

    async def _post(self, url: str, content: bytes, push: Push, *, renew: bool) -> httpx.Response | Result:
        headers = {
            "authorization": f"bearer {self._provider_token(renew=renew)}",
            "apns-topic": push.app_id,
            "apns-push-type": "alert",
            # A badge update is an alert push too (Apple's type for alerts, sounds and badges), sent at low priority.
            "apns-priority": "10" if push.high_priority else "5",
            "apns-expiration": str(push.expires_at),
            "apns-collapse-id": push.collapse_id[:64],
        }
        try:
            return await self._client.post(url, content=content, headers=headers)
        except httpx.HTTPError as exc:
            return Result("retry", f"APNs unreachable: {exc!r}")

    async def send(self, push: Push) -> Result:
        """Send one push; renew the provider token once if APNs says it expired."""
        url = f"{self._settings.endpoint}/3/device/{push.token}"
        content = self._payload(push)
        response = await self._post(url, content, push, renew=False)
        if (
            isinstance(response, httpx.Response)
            and response.status_code == 403
            and _reason(response) == "ExpiredProviderToken"
        ):
            response = await self._post(url, content, push, renew=True)
        if isinstance(response, Result):
            return response
        return classify(response, self._clock())
