"""FCM HTTP v1: OAuth2 service-account flow and message sends.

The access token comes from the JWT-bearer grant (RFC 7523): a JWT signed
with the service account's RSA key (RS256) is exchanged at ``token_uri`` for
a one-hour access token, cached until a minute before it expires (and
dropped early if FCM answers 401).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
from belfry import ssrf
from belfry.queue.sender import Result

from services.mobile.push import Push
from services.mobile.settings import FcmSettings

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_EARLY = 60.0


def _error(response: httpx.Response) -> tuple[str, str, str]:
    """(status, FCM errorCode, message) from a Google API error body."""
    try:
        error = response.json().get("error", {})
    except ValueError:
        return "", "", response.text[:200]
    code = ""
    for detail in error.get("details", []) or []:
        if str(detail.get("@type", "")).endswith("FcmError"):
            code = str(detail.get("errorCode", ""))
    return str(error.get("status", "")), code, str(error.get("message", ""))


def classify(response: httpx.Response, now: float) -> Result:  # noqa: PLR0911 - one return per documented error
    """FCM's documented error codes → a result."""
    if response.status_code == 200:
        return Result("sent")
    status, code, message = _error(response)
    retry_after = ssrf.retry_after_seconds(response.headers.get("retry-after"), now)
    label = f"FCM {response.status_code} {code or status}: {message}".strip()
    if code == "UNREGISTERED" or response.status_code == 404:
        return Result("gone", label)
    if code == "SENDER_ID_MISMATCH":
        return Result("gone", label)
    if response.status_code == 400 and "registration token" in message.lower():
        return Result("gone", label)
    if response.status_code in (429, 503) or code in ("QUOTA_EXCEEDED", "UNAVAILABLE"):
        return Result("retry", label, retry_after)
    if response.status_code >= 500:
        return Result("retry", label, retry_after)
    return Result("fail", label)


class Fcm:
    """Sends to Android devices through FCM HTTP v1."""

    def __init__(self, settings: FcmSettings, client: httpx.AsyncClient, *, clock: Callable[[], float] = time.time):
        self._settings = settings
        self._client = client
        self._clock = clock
        self._token: tuple[str, float] | None = None
        self._lock = asyncio.Lock()
        self.exchanges = 0  # token exchanges made (observability)

    async def _access_token(self) -> str:
        async with self._lock:  # one exchange at a time: a burst of sends shares the new token
            now = self._clock()
            if self._token is not None and self._token[1] - _EARLY > now:
                return self._token[0]
            assertion = jwt.encode(
                {
                    "iss": self._settings.client_email,
                    "scope": SCOPE,
                    "aud": self._settings.token_uri,
                    "iat": int(now),
                    "exp": int(now) + 3600,
                },
                self._settings.private_key,
                algorithm="RS256",
            )
            response = await self._client.post(
                self._settings.token_uri, data={"grant_type": GRANT, "assertion": assertion}
            )
            self.exchanges += 1
            if response.status_code != 200:
                raise PermissionError(f"FCM token exchange refused ({response.status_code}): {response.text[:200]}")
            body = response.json()
            self._token = (str(body["access_token"]), now + float(body.get("expires_in", 3600)))
            return self._token[0]

    def _message(self, push: Push) -> dict[str, Any]:
        android = {"collapse_key": push.collapse_id, "ttl": f"{push.ttl_seconds}s"}
        if not push.title:
            # A badge update: a data message the app handles in the background (Android has no badge an
            # app server sets on its own), at normal priority.
            data = {"badge": str(push.badge)}
            return {"message": {"token": push.token, "data": data, "android": {**android, "priority": "NORMAL"}}}
        return {
            "message": {
                "token": push.token,
                "notification": {"title": push.title, "body": push.body},
                "data": {
                    "url": push.url,
                    "notification_id": push.notification_id,
                    "topic": push.topic,
                    "badge": str(push.badge),
                },
                "android": {
                    **android,
                    "priority": "HIGH" if push.high_priority else "NORMAL",
                    "notification": {
                        "tag": push.notification_id,
                        "click_action": "OPEN_NOTIFICATION",
                        "notification_count": push.badge,
                    },
                },
            }
        }

    async def _post(self, url: str, push: Push) -> httpx.Response | Result:
        try:
            token = await self._access_token()
            return await self._client.post(url, json=self._message(push), headers={"authorization": f"Bearer {token}"})
        except PermissionError as exc:
            return Result("fail", str(exc))
        except httpx.HTTPError as exc:
            return Result("retry", f"FCM unreachable: {exc!r}")

    async def send(self, push: Push) -> Result:
        """Send one message; a 401 drops the cached access token and tries once more with a new one."""
        url = f"{self._settings.endpoint}/v1/projects/{self._settings.project_id}/messages:send"
        response = await self._post(url, push)
        if isinstance(response, httpx.Response) and response.status_code == 401:
            self._token = None
            response = await self._post(url, push)
        if isinstance(response, Result):
            return response
        return classify(response, self._clock())
