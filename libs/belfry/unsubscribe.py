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
from typing import Any
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


class Links:
    """Signed, expiring links under one key set: the current key signs, it and the ``others`` verify.

    ``purpose`` is covered by the MAC, so a link made for one purpose (an
    unsubscribe, ``b""``; an email's open link, ``b"open."``) is never
    accepted for another under the same keys.
    """

    def __init__(
        self,
        key: bytes,
        *,
        ttl_seconds: int,
        clock: Callable[[], float] = time.time,
        others: Sequence[bytes] = (),
        purpose: bytes = b"",
    ) -> None:
        if len(key) < 32 or any(len(k) < 32 for k in others):
            raise ValueError("the unsubscribe key must be at least 32 bytes")
        self._key = key
        self._keys = (key, *(k for k in others if k != key))  # the current one is tried first
        self._ttl = ttl_seconds
        self._clock = clock
        self._purpose = purpose

    def sharing(self, purpose: bytes) -> Links:
        """Links for another purpose under the same keys, time to live and clock (one rotation for both)."""
        return Links(self._key, ttl_seconds=self._ttl, clock=self._clock, others=self._keys[1:], purpose=purpose)

    def _mac(self, body: str, key: bytes) -> bytes:
        return _b64(hmac.new(key, self._purpose + body.encode(), hashlib.sha256).digest()).encode()

    def sign(self, claims: dict[str, object]) -> str:
        """A token carrying ``claims`` and an expiry ``e``, valid for the configured time to live."""
        body = _b64(json.dumps({**claims, "e": int(self._clock()) + self._ttl}, separators=(",", ":")).encode())
        return f"{body}.{self._mac(body, self._key).decode()}"

    def open(self, token: str, *, invalid: str, expired: str) -> dict[str, Any]:
        """The claims of a genuine, unexpired token; InvalidArgument (``invalid`` or ``expired``) otherwise."""
        body, _, mac = token.partition(".")
        # Bytes: a non-ASCII MAC in a forged link must fail the comparison, not raise.
        given = mac.encode()
        if not body or not any(hmac.compare_digest(given, self._mac(body, key)) for key in self._keys):
            raise InvalidArgument(invalid, field="t")
        try:
            claims = json.loads(_unb64(body))
            expires = int(claims["e"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(invalid, field="t") from exc
        if not isinstance(claims, dict):
            raise InvalidArgument(invalid, field="t")
        if expires < self._clock():
            raise InvalidArgument(expired, field="t")
        return claims


class Signer(Links):
    """Unsubscribe links (the purpose-less tokens of every earlier release, so links in inboxes keep working)."""

    def token(self, account_id: str, user_id: str, topic: str) -> str:
        """A token valid for the configured time to live."""
        return self.sign({"a": account_id, "u": user_id, "t": topic})

    def url(self, base_url: str, account_id: str, user_id: str, topic: str) -> str:
        """The HTTPS link for the List-Unsubscribe header and the email footer."""
        return f"{base_url}{PATH}?t={quote(self.token(account_id, user_id, topic))}"

    def verify(self, token: str) -> Unsubscribe:
        """The request a token carries; InvalidArgument when forged, damaged or expired."""
        invalid = "this unsubscribe link is not valid"
        claims = self.open(
            token,
            invalid=invalid,
            expired="this unsubscribe link has expired; change your email preferences in the app instead",
        )
        try:
            return Unsubscribe(str(claims["a"]), str(claims["u"]), str(claims["t"]), int(claims["e"]))
        except KeyError as exc:
            raise InvalidArgument(invalid, field="t") from exc
