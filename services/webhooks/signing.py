"""Signing secrets: generated per webhook, stored encrypted, used for HMAC-SHA256 signatures.

The signature scheme is Slack's: ``v1=hex(HMAC-SHA256(secret, "v1:" + timestamp + ":" + body))``
in ``X-Belfry-Signature`` with the Unix ``X-Belfry-Timestamp``; a receiver
rejects old timestamps (replays) and compares in constant time.

**Rotating the sealing key without downtime.** Secrets are sealed under the
current key (``BELFRY_WEBHOOK_SECRET_KEY``) and opened under it or any of
the other keys (``BELFRY_WEBHOOK_SECRET_OTHER_KEYS``); while other keys are
configured, each replica re-seals under the current key every secret that
opens only under another one (``webhooks.server``: at start, then hourly).
Steps: hold the new key as an other key everywhere; make it current (the
old one held); once the re-seal pass logs that none remain, drop the old key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from belfry import log
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_LOG = log.get(__name__)
_NONCE = 12


def load_or_create_key(raw: str, path: Path | None) -> bytes:
    """The 32-byte data key from base64 text, or from ``path`` (written with a new key when missing)."""
    if not raw and path is not None:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(base64.b64encode(secrets.token_bytes(32)).decode())
            _LOG.info("generated the webhook secret key", path=str(path))
        raw = path.read_text().strip()
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("the webhook secret key must be base64") from exc
    if len(key) != 32:
        raise ValueError("the webhook secret key must be 32 bytes (base64 of 32 random bytes)")
    return key


def parse_keys(raw: str) -> tuple[bytes, ...]:
    """``base64,base64`` → 32-byte keys (ValueError says which entry is wrong)."""
    keys = []
    for i, part in enumerate(p.strip() for p in raw.split(",") if p.strip()):
        try:
            key = base64.b64decode(part, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"entry {i + 1} is not base64") from exc
        if len(key) != 32:
            raise ValueError(f"entry {i + 1} is not 32 bytes (base64 of 32 random bytes)")
        keys.append(key)
    return tuple(keys)


class SecretBox:
    """AES-256-GCM of signing secrets, bound to their row (account, webhook) so rows cannot swap secrets.

    Seals under ``key``; opens under it or any of ``others`` (a rotation under way).
    """

    def __init__(self, key: bytes, others: tuple[bytes, ...] = ()) -> None:
        self._aead = AESGCM(key)
        self._others = tuple(AESGCM(k) for k in others if k != key)

    @property
    def rotating(self) -> bool:
        """Whether other keys are held (secrets may need re-sealing)."""
        return bool(self._others)

    def seal(self, secret: str, account_id: str, webhook_id: str) -> bytes:
        """nonce ‖ ciphertext."""
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, secret.encode(), f"{account_id}/{webhook_id}".encode())

    def open(self, sealed: bytes, account_id: str, webhook_id: str) -> str:
        """The secret (raises cryptography's InvalidTag when tampered with or under a key not held)."""
        return self.open_current(sealed, account_id, webhook_id)[0]

    def open_current(self, sealed: bytes, account_id: str, webhook_id: str) -> tuple[str, bool]:
        """The secret and whether it is sealed under the current key (False: re-seal it)."""
        nonce, ciphertext, row = sealed[:_NONCE], sealed[_NONCE:], f"{account_id}/{webhook_id}".encode()
        try:
            return self._aead.decrypt(nonce, ciphertext, row).decode(), True
        except InvalidTag:
            for other in self._others:
                try:
                    return other.decrypt(nonce, ciphertext, row).decode(), False
                except InvalidTag:
                    continue
            raise


def new_secret() -> str:
    """A fresh signing secret (shown to the user once)."""
    return "whsec_" + secrets.token_urlsafe(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Belfry-Signature`` value."""
    mac = hmac.new(secret.encode(), b"v1:" + str(timestamp).encode() + b":" + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify(secret: str, timestamp: int, body: bytes, header: str, *, now: int, tolerance: int = 300) -> bool:
    """What a receiver does: fresh timestamp and a constant-time comparison."""
    if abs(now - timestamp) > tolerance:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), header)
