"""An APNs provider API on loopback: HTTP/2 only (ALPN h2, via the h2 library), token-based auth.

It checks what Apple checks: the path ``/3/device/<hex token>``, an ES256
provider JWT whose ``kid`` names the key and whose signature verifies with
it, ``iss`` equal to the team id, ``iat`` no older than an hour (else 403
ExpiredProviderToken), ``apns-topic`` equal to the app's bundle id,
``apns-push-type`` present, and a JSON payload of at most 4 KB with ``aps``.
Errors use Apple's status codes and ``reason`` strings.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from tests.push.fakes.tls import Pki


@dataclass
class ApnsPush:
    """One accepted push."""

    token: str
    headers: dict[str, str]
    payload: dict[str, Any]


@dataclass
class FakeApns:
    """State and checks of the fake; ``serve`` binds it."""

    public_key: ec.EllipticCurvePublicKey
    key_id: str
    team_id: str
    bundle_id: str
    received: list[ApnsPush] = field(default_factory=list)
    jwts: list[str] = field(default_factory=list)
    scripted: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # token → (status, reason)
    alpn: list[str | None] = field(default_factory=list)

    def answer(  # noqa: PLR0911, PLR0912 - one answer per check Apple documents
        self, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, Any] | None]:
        """(status, JSON error body or None) for one request."""
        if headers.get(":method") != "POST" or not headers.get(":path", "").startswith("/3/device/"):
            return 405, {"reason": "MethodNotAllowed"}
        token = headers[":path"].removeprefix("/3/device/")
        auth = headers.get("authorization", "")
        if not auth.startswith("bearer "):
            return 403, {"reason": "MissingProviderToken"}
        provider_token = auth.removeprefix("bearer ")
        self.jwts.append(provider_token)
        try:
            header = jwt.get_unverified_header(provider_token)
            claims = jwt.decode(provider_token, self.public_key, algorithms=["ES256"], options={"require": ["iat"]})
        except jwt.PyJWTError:
            return 403, {"reason": "InvalidProviderToken"}
        if header.get("kid") != self.key_id or claims.get("iss") != self.team_id:
            return 403, {"reason": "InvalidProviderToken"}
        if claims["iat"] < time.time() - 3600:
            return 403, {"reason": "ExpiredProviderToken"}
        scripted = self.scripted.get(token)
        if scripted:
            status, reason = scripted.pop(0)
            extra = {"timestamp": int(time.time() * 1000)} if status == 410 else {}
            return status, {"reason": reason, **extra}
        if not headers.get("apns-topic"):
            return 400, {"reason": "MissingTopic"}
        if headers["apns-topic"] != self.bundle_id:
            return 400, {"reason": "DeviceTokenNotForTopic"}
        if headers.get("apns-push-type") not in ("alert", "background"):
            return 400, {"reason": "InvalidPushType"}
        if len(token) < 64 or any(c not in "0123456789abcdefABCDEF" for c in token):
            return 400, {"reason": "BadDeviceToken"}
        if len(headers.get("apns-collapse-id", "")) > 64:
            return 400, {"reason": "BadCollapseId"}
        if len(body) > 4096:
            return 413, {"reason": "PayloadTooLarge"}
        try:
            payload = json.loads(body)
        except ValueError:
            return 400, {"reason": "PayloadEmpty" if not body else "BadMessageId"}
        if "aps" not in payload:
            return 400, {"reason": "PayloadEmpty"}
        self.received.append(ApnsPush(token, headers, payload))
        return 200, None

    async def serve(self, pki: Pki) -> asyncio.Server:
        """Listen on 127.0.0.1 (port 0) with TLS offering only h2."""
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _H2(self), "127.0.0.1", 0, ssl=pki.server_context(alpn=("h2",)))


class _H2(asyncio.Protocol):
    def __init__(self, fake: FakeApns) -> None:
        self._fake = fake
        self._conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self._streams: dict[int, tuple[dict[str, str], bytearray]] = {}
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        self._fake.alpn.append(ssl_object.selected_alpn_protocol() if ssl_object else None)
        self._conn.initiate_connection()
        transport.write(self._conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError:  # not HTTP/2 (e.g. an HTTP/1.1 client): what Apple does too
            self._transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._streams[event.stream_id] = (dict(event.headers), bytearray())  # type: ignore[arg-type]
            elif isinstance(event, h2.events.DataReceived):
                self._streams[event.stream_id][1].extend(event.data)
                self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self._respond(event.stream_id)
        self._transport.write(self._conn.data_to_send())

    def _respond(self, stream_id: int) -> None:
        headers, body = self._streams.pop(stream_id)
        status, error = self._fake.answer(headers, bytes(body))
        out = [(":status", str(status)), ("apns-id", str(uuid.uuid4()).upper())]
        if error is None:
            self._conn.send_headers(stream_id, out, end_stream=True)
            return
        data = json.dumps(error).encode()
        self._conn.send_headers(stream_id, [*out, ("content-type", "application/json")], end_stream=False)
        self._conn.send_data(stream_id, data, end_stream=True)
