"""Signed, expiring one-click unsubscribe links (RFC 8058).

A link names (account, user, topic) and an expiry, signed with HMAC-SHA256
under ``BELFRY_UNSUBSCRIBE_KEY``: the email sender signs them, the gateway
(the web app's origin) verifies them at ``/email/unsubscribe``, where a GET
shows a confirmation page (link scanners must not unsubscribe anyone) and a
POST — the mail client's one-click ``List-Unsubscribe=One-Click`` or the
page's button — switches that topic off for email for that user through the
preferences service's ``Unsubscribe`` RPC.

**Rotation without downtime.** Links are signed with the current key and
accepted under it or any of ``others`` (``BELFRY_UNSUBSCRIBE_OTHER_KEYS``),
so every replica, signer or verifier, accepts both keys at every step:
first each service gets the new key as an other key (nothing signs with it
yet); then the new key becomes current and the old one an other key (links
already in inboxes keep working); once the links' time to live has passed
(``BELFRY_UNSUBSCRIBE_TTL_SECONDS``), the old key is dropped.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import quote

from belfry.errors import InvalidArgument

PATH = "/email/unsubscribe"


@dataclass(frozen=True)
class Unsubscribe:
    """What a valid link asks for."""

    account_id: str
    user_id: str
    topic: str
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_keys(raw: str) -> tuple[bytes, ...]:
    """``key,key`` → the keys (ValueError names a short one); whitespace around each is dropped."""
    keys = tuple(k.strip().encode() for k in raw.split(",") if k.strip())
    if any(len(k) < 32 for k in keys):
        raise ValueError("every unsubscribe key must be at least 32 characters")
    return keys


class Signer:
    """Signs with the current key, checks under it and the ``others``; ``clock`` is injectable for tests."""

    def __init__(
        self,
        key: bytes,
        *,
        ttl_seconds: int,
        clock: Callable[[], float] = time.time,
        others: Sequence[bytes] = (),
    ) -> None:
        if len(key) < 32 or any(len(k) < 32 for k in others):
            raise ValueError("the unsubscribe key must be at least 32 bytes")
        self._key = key
        self._keys = (key, *(k for k in others if k != key))  # the current one is tried first
        self._ttl = ttl_seconds
        self._clock = clock

    def _mac(self, body: str, key: bytes | None = None) -> str:
        return _b64(hmac.new(key or self._key, body.encode(), hashlib.sha256).digest())

    def token(self, account_id: str, user_id: str, topic: str) -> str:
        """A token valid for the configured time to live."""
        claims = {"a": account_id, "u": user_id, "t": topic, "e": int(self._clock()) + self._ttl}
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{body}.{self._mac(body)}"

    def url(self, base_url: str, account_id: str, user_id: str, topic: str) -> str:
        """The HTTPS link for the List-Unsubscribe header and the email footer."""
        return f"{base_url}{PATH}?t={quote(self.token(account_id, user_id, topic))}"

    def verify(self, token: str) -> Unsubscribe:
        """The request a token carries; InvalidArgument when forged, damaged or expired."""
        body, _, mac = token.partition(".")
        if not body or not any(hmac.compare_digest(mac, self._mac(body, key)) for key in self._keys):
            raise InvalidArgument("this unsubscribe link is not valid", field="t")
        try:
            claims = json.loads(_unb64(body))
            found = Unsubscribe(str(claims["a"]), str(claims["u"]), str(claims["t"]), int(claims["e"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument("this unsubscribe link is not valid", field="t") from exc
        if found.expires_at < self._clock():
            raise InvalidArgument(
                "this unsubscribe link has expired; change your email preferences in the app instead", field="t"
            )
        return found
