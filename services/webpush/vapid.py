"""VAPID (RFC 8292): the application server's key and its cached signed header.

A fresh JWT per push costs an ECDSA signature for nothing: the header for a
push service origin is signed once and reused until an hour before its expiry
(the JWT lives 12 h; RFC 8292 allows up to 24 h).

**Rotation.** A push service accepts a push only when it is signed with the
key the browser subscribed with, so a subscription keeps its key
(``vapid_key``) and each push is signed with that one. New subscriptions get
the current key (``GetVapidPublicKey``); the other keys
(``BELFRY_VAPID_OTHER_KEYS`` / ``_FILES``) keep signing for the subscriptions
made with them until those browsers subscribe again with the current key
(the web app does it when it sees its subscription bound to another key).
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jwt
from belfry import log
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

_LOG = log.get(__name__)

LIFETIME_SECONDS = 12 * 3600
RENEW_BEFORE_SECONDS = 3600


def b64url(data: bytes) -> str:
    """Base64url without padding, as the Push API spells keys."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def load_or_create(pem: str, path: Path | None) -> ec.EllipticCurvePrivateKey:
    """The private key from PEM text, or from ``path`` (written with a new key when missing)."""
    if pem:
        data = pem.encode()
    elif path is not None and path.exists():
        data = path.read_bytes()
    elif path is not None:
        key = ec.generate_private_key(ec.SECP256R1())
        data = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created 0600 in one step: the key must never be readable by others, even briefly.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        _LOG.info("generated a VAPID key pair", path=str(path))
    else:
        raise ValueError("no VAPID private key configured")
    key_obj = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key_obj, ec.EllipticCurvePrivateKey) or not isinstance(key_obj.curve, ec.SECP256R1):
        raise ValueError("the VAPID private key must be a P-256 (prime256v1) EC key")
    return key_obj


class Vapid:
    """Signs and caches ``Authorization: vapid t=…, k=…`` per push-service origin."""

    def __init__(
        self, key: ec.EllipticCurvePrivateKey, subject: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._key = key
        self._subject = subject
        self._clock = clock
        self.public_key = b64url(
            key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        )
        self._cache: dict[str, tuple[float, str]] = {}

    def header(self, origin: str) -> str:
        """The Authorization value for ``origin`` (``https://host[:port]``), signed at most every 11 h."""
        now = self._clock()
        cached = self._cache.get(origin)
        if cached is not None and cached[0] - RENEW_BEFORE_SECONDS > now:
            return cached[1]
        expires = int(now) + LIFETIME_SECONDS
        token = jwt.encode({"aud": origin, "exp": expires, "sub": self._subject}, self._key, algorithm="ES256")
        value = f"vapid t={token}, k={self.public_key}"
        self._cache[origin] = (expires, value)
        return value


_PEM_BLOCK = re.compile(r"-----BEGIN [A-Z ]+-----.+?-----END [A-Z ]+-----", re.DOTALL)


def parse_keys(pem_text: str, files: Sequence[Path] = ()) -> tuple[ec.EllipticCurvePrivateKey, ...]:
    """Every PEM private key in ``pem_text`` (blocks one after another) and in ``files``; ValueError names a bad one."""
    blocks = [m.group(0) for m in _PEM_BLOCK.finditer(pem_text)]
    if pem_text.strip() and not blocks:
        raise ValueError("holds no PEM block")
    for path in files:
        blocks += [m.group(0) for m in _PEM_BLOCK.finditer(path.read_text())]
    return tuple(load_or_create(block, None) for block in blocks)


class Keyring:
    """The current VAPID signer and the other ones still bound to subscriptions, by public key."""

    def __init__(self, current: Vapid, others: Sequence[Vapid] = ()) -> None:
        self.current = current
        self._by_key = {v.public_key: v for v in (*others, current)}

    @property
    def rotating(self) -> bool:
        """Whether other keys are held."""
        return len(self._by_key) > 1

    def holds(self, public_key: str) -> bool:
        """Whether pushes can be signed for subscriptions bound to ``public_key``."""
        return public_key in self._by_key

    def signer(self, public_key: str) -> Vapid | None:
        """The signer for a subscription bound to ``public_key``; None when not held during a rotation.

        '' (not recorded) is the current key; so is any key outside a rotation, as before keys
        were recorded: a key replaced without rotating leaves the push services to refuse.
        """
        if not public_key or not self.rotating:
            return self.current
        return self._by_key.get(public_key)
