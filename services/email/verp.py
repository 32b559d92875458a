"""VERP: an envelope sender per delivery, so a bounce names the delivery it belongs to.

``bounces+<account>-<delivery>-<mac>@<bounce domain>``: the account id in
lower-case base32 (local parts may be case-folded by relays), the delivery
id in decimal, and an HMAC-SHA256 (truncated to 80 bits, base32) over the
account, the delivery and the recipient address. The MAC binds all three:
a token cannot be edited into another account's delivery, nor used to
report some other address of the account as bouncing (the receiver checks
it against the recipient the report names). Keys rotate: the first key
signs, every key verifies, so an old key stays listed until the bounces of
mail signed with it have come back.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass

PREFIX = "bounces"
_TOKEN = re.compile(r"bounces\+([a-z2-7]+)-([0-9]{1,19})-([a-z2-7]{16})@(.+)", re.IGNORECASE)


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _unb32(text: str) -> bytes:
    padded = text.upper() + "=" * (-len(text) % 8)
    return base64.b32decode(padded)


@dataclass(frozen=True)
class Bounce:
    """What a verified envelope address names."""

    account_id: str
    delivery_id: int


@dataclass(frozen=True)
class Verp:
    """Signs envelope senders with ``keys[0]``; verifies with any of ``keys``."""

    keys: Sequence[bytes]
    domain: str

    def _mac(self, key: bytes, account_id: str, delivery_id: int, recipient: str) -> str:
        message = b"\0".join((account_id.encode(), str(delivery_id).encode(), recipient.lower().encode()))
        return _b32(hmac.new(key, message, hashlib.sha256).digest()[:10])

    def address(self, account_id: str, delivery_id: int, recipient: str) -> str:
        """The envelope sender (MAIL FROM) of ``delivery_id`` to ``recipient``."""
        mac = self._mac(self.keys[0], account_id, delivery_id, recipient)
        return f"{PREFIX}+{_b32(account_id.encode())}-{delivery_id}-{mac}@{self.domain}"

    def claimed(self, envelope: str) -> Bounce | None:
        """The delivery ``envelope`` claims to name, unverified: the bounce receiver looks up that
        delivery's recipient and only then can check the MAC (:meth:`verify`). None when it is not
        shaped like one of this domain's envelope senders."""
        found = _TOKEN.fullmatch(envelope.strip().strip("<>"))
        if found is None or found.group(4).lower() != self.domain.lower():
            return None
        try:
            account_id = _unb32(found.group(1)).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        return Bounce(account_id, int(found.group(2)))

    def verify(self, envelope: str, recipient: str) -> Bounce | None:
        """The delivery ``envelope`` names when it is ours and was signed for ``recipient``, else None."""
        found = _TOKEN.fullmatch(envelope.strip().strip("<>"))
        claim = self.claimed(envelope)
        if found is None or claim is None:
            return None
        account_id, delivery_id = claim.account_id, claim.delivery_id
        mac = found.group(3).lower()
        for key in self.keys:
            if hmac.compare_digest(self._mac(key, account_id, delivery_id, recipient), mac):
                return Bounce(account_id, delivery_id)
        return None
