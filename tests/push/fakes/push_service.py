"""A browser push service (RFC 8030) on loopback TLS that checks what a real one checks.

It issues subscriptions the way a browser would (a P-256 key pair and a
16-byte auth secret per subscription), and for each push it verifies the
VAPID authorization (RFC 8292: ES256 JWT signed by the key in ``k=``, ``aud``
equal to its own origin, ``exp`` in the future and no more than 24 h away, a
``sub`` contact) and decrypts the aes128gcm body (RFC 8291) with the
subscription's private key — what the browser itself would do. A
subscription made with an application server key accepts only pushes whose
VAPID ``k=`` is that key (403 otherwise), as FCM and Mozilla's autopush
do. Scripted
answers (410, 429 with Retry-After, a redirect…) let tests drive each case.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import http_ece
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def b64url(data: bytes) -> str:
    """Base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    """Decode base64url with or without padding."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class BrowserSubscription:
    """The browser's side of a subscription: what it hands the page, and the secrets it keeps."""

    sub_id: str
    endpoint: str
    private_key: ec.EllipticCurvePrivateKey
    auth: bytes
    application_server_key: str = ""  # the VAPID public key passed to subscribe(); '' = not bound

    @property
    def p256dh(self) -> str:
        """The public key the page sends to the application server."""
        point = self.private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return b64url(point)


@dataclass
class Received:
    """One accepted push, decrypted."""

    sub_id: str
    payload: dict[str, Any]
    headers: dict[str, str]
    jwt_claims: dict[str, Any]


@dataclass
class PushService:
    """State of the fake; ``app`` is its ASGI application."""

    origin: str = ""  # set once the port is known: https://localhost:<port>
    subscriptions: dict[str, BrowserSubscription] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # why requests were refused
    requests: int = 0
    scripted: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def subscribe(self, host: str = "localhost", application_server_key: str = "") -> BrowserSubscription:
        """A new subscription, as ``pushManager.subscribe()`` would produce (bound to the key when given)."""
        sub_id = uuid.uuid4().hex
        port = self.origin.rsplit(":", 1)[1]
        sub = BrowserSubscription(
            sub_id,
            f"https://{host}:{port}/push/{sub_id}",
            ec.generate_private_key(ec.SECP256R1()),
            _random16(),
            application_server_key,
        )
        self.subscriptions[sub_id] = sub
        return sub

    def script(self, sub_id: str, *answers: tuple[int, dict[str, str]]) -> None:
        """Answer the next pushes to ``sub_id`` with these (status, headers) instead of accepting them."""
        self.scripted.setdefault(sub_id, []).extend(answers)

    def _refuse(self, status: int, why: str) -> Response:
        self.rejected.append(why)
        return Response(why, status_code=status)

    async def push(self, request: Request) -> Response:  # noqa: PLR0911 - one answer per check, as a real service
        """POST /push/{id}: RFC 8030 message delivery."""
        self.requests += 1
        sub = self.subscriptions.get(request.path_params["sub_id"])
        if sub is None:
            return Response(status_code=404)
        scripted = self.scripted.get(sub.sub_id)
        if scripted:
            status, headers = scripted.pop(0)
            self.arrived.set()
            return Response(status_code=status, headers=headers)
        origin = sub.endpoint.rsplit("/push/", 1)[0]  # the origin the subscription's endpoint names
        if request.headers.get("host") != origin.removeprefix("https://"):
            return self._refuse(400, f"wrong Host header {request.headers.get('host')!r}")
        ttl = request.headers.get("ttl", "")
        if not ttl.isdigit():
            return self._refuse(400, "missing or invalid TTL header")
        topic = request.headers.get("topic")
        if topic is not None and (len(topic) > 32 or not all(c.isalnum() or c in "-_" for c in topic)):
            return self._refuse(400, "Topic must be at most 32 base64url characters")
        claims = self._check_vapid(request.headers.get("authorization", ""), origin)
        if isinstance(claims, str):
            return self._refuse(401, claims)
        if (
            sub.application_server_key
            and _vapid_fields(request.headers["authorization"]).get("k") != sub.application_server_key
        ):
            return self._refuse(403, "the VAPID key is not the one the subscription was created with")
        if request.headers.get("content-encoding") != "aes128gcm":
            return self._refuse(400, "Content-Encoding must be aes128gcm")
        body = await request.body()
        if len(body) > 4096:
            return self._refuse(413, "payload larger than 4096 bytes")
        try:
            plain = http_ece.decrypt(body, private_key=sub.private_key, auth_secret=sub.auth, version="aes128gcm")
        except Exception as exc:
            return self._refuse(400, f"cannot decrypt: {exc!r}")
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.received.append(Received(sub.sub_id, json.loads(plain), headers, claims))
        self.arrived.set()
        return Response(status_code=201, headers={"location": f"{self.origin}/message/{uuid.uuid4().hex}"})

    def _check_vapid(self, header: str, origin: str) -> dict[str, Any] | str:
        scheme = header.partition(" ")[0]
        if scheme.lower() != "vapid":
            return "Authorization must use the vapid scheme"
        fields = _vapid_fields(header)
        try:
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64url(fields["k"]))
            claims: dict[str, Any] = jwt.decode(
                fields["t"], key, algorithms=["ES256"], audience=origin, options={"require": ["exp", "sub"]}
            )
        except (KeyError, ValueError, jwt.PyJWTError) as exc:
            return f"invalid VAPID token: {exc!r}"
        if claims["exp"] > time.time() + 24 * 3600:
            return "VAPID exp more than 24 hours ahead"
        if not str(claims["sub"]).startswith(("mailto:", "https://")):
            return "VAPID sub must be a mailto: or https: URL"
        return claims

    @property
    def app(self) -> Starlette:
        """The ASGI application."""
        return Starlette(routes=[Route("/push/{sub_id}", self.push, methods=["POST"])])


def _vapid_fields(header: str) -> dict[str, str]:
    """``vapid t=<jwt>, k=<key>`` → {"t": ..., "k": ...}."""
    params = header.partition(" ")[2]
    return dict(part.strip().split("=", 1) for part in params.split(",") if "=" in part)


def _random16() -> bytes:
    import os

    return os.urandom(16)
