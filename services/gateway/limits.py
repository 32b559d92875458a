"""What one upload, one client, one user and all of them together may take from a gateway replica.

* **Bodies.** ``HttpGate`` refuses a body larger than ``max_body_bytes`` with
  413: from ``Content-Length`` before reading a byte, and while streaming
  (chunked bodies, or a declared length that lies) as soon as the count
  passes the limit. It reads the whole bounded body before the route runs,
  so no route ever parses more than the limit.
* **Rates.** Token buckets per client address (every ``/api/``, ``/email/``
  request and every websocket handshake) and per user (every authenticated
  API request, ``api.Guard``): an empty bucket is 429 with ``Retry-After``.
  IPv6 clients are counted per /64, the block one subscriber usually holds.
* **Sockets.** ``ws.Endpoint`` caps the websockets of the replica, of one
  client address and of one user (``Bounds.max_sockets*``).
* **Idle connections.** ``HeaderDeadline`` closes a connection whose request
  head has not arrived within the deadline (a connection that never sends a
  request would otherwise be held for ever).

Buckets live in the replica's memory: the limits are per replica, as the
load balancer spreads a client's requests over replicas (see docs/gateway.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from belfry.config import Env
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

_LIMITED_PREFIXES = ("/api/", "/email/")


@dataclass(frozen=True)
class Bounds:
    """The replica's limits (``load_bounds`` reads them); a rate of 0 switches that limit off."""

    max_body_bytes: int = 256 * 1024
    user_rate: float = 20.0  # API requests per second per user
    user_burst: float = 60.0
    client_rate: float = 50.0  # API requests and websocket handshakes per second per client address
    client_burst: float = 200.0
    max_sockets: int = 10_000  # websockets of this replica
    max_sockets_per_user: int = 20
    max_sockets_per_client: int = 200
    trusted_proxies: tuple[str, ...] = ()  # peers whose X-Forwarded-For names the client


def load_bounds(env: Env) -> Bounds:
    """``BELFRY_GATEWAY_MAX_BODY_BYTES``, the rates, the socket caps and the trusted proxies."""
    proxies = tuple(p.strip() for p in env.str("BELFRY_GATEWAY_TRUSTED_PROXIES", "").split(",") if p.strip())
    for proxy in proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            env.problem(f"BELFRY_GATEWAY_TRUSTED_PROXIES entry {proxy!r} must be an address or a network (CIDR)")
    return Bounds(
        max_body_bytes=env.int("BELFRY_GATEWAY_MAX_BODY_BYTES", Bounds.max_body_bytes, minimum=1024),
        user_rate=env.float("BELFRY_GATEWAY_USER_RATE", Bounds.user_rate),
        user_burst=env.float("BELFRY_GATEWAY_USER_BURST", Bounds.user_burst, minimum=1.0),
        client_rate=env.float("BELFRY_GATEWAY_CLIENT_RATE", Bounds.client_rate),
        client_burst=env.float("BELFRY_GATEWAY_CLIENT_BURST", Bounds.client_burst, minimum=1.0),
        max_sockets=env.int("BELFRY_GATEWAY_MAX_SOCKETS", Bounds.max_sockets, minimum=1),
        max_sockets_per_user=env.int("BELFRY_GATEWAY_MAX_SOCKETS_PER_USER", Bounds.max_sockets_per_user, minimum=1),
        max_sockets_per_client=env.int(
            "BELFRY_GATEWAY_MAX_SOCKETS_PER_CLIENT", Bounds.max_sockets_per_client, minimum=1
        ),
        trusted_proxies=proxies,
    )


class Buckets:
    """Token buckets by key: ``rate`` per second, ``burst`` deep; a rate of 0 allows everything.

    Idle keys are forgotten once more than ``max_keys`` are held (a full
    bucket and a forgotten one allow the same), so a client that rotates
    addresses cannot grow the table without bound.
    """

    def __init__(
        self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000
    ) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens, stamp]

    def take(self, key: str) -> float:
        """Spend one token; 0 when allowed, else the seconds until one is back."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._forget_idle(now)
            bucket = self._buckets[key] = [self.burst, now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.rate

    def _forget_idle(self, now: float) -> None:
        full = self.burst / self.rate  # seconds for an empty bucket to fill
        self._buckets = {k: b for k, b in self._buckets.items() if now - b[1] < full}
        if len(self._buckets) >= self._max_keys:  # everyone is busy: start over rather than grow
            self._buckets.clear()


def client_key(scope: Scope) -> str:
    """The client's address as the rate limits and socket caps count it (IPv6: its /64)."""
    client = scope.get("client")
    host = str(client[0]) if client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, at least one."""
    return str(max(1, math.ceil(seconds)))


async def refuse(send: Send, status: int, message: str, *, wait: float | None = None) -> None:
    """Answer with a JSON error and close the connection (the rest of the body is never read)."""
    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    if wait is not None:
        headers.append((b"retry-after", retry_after(wait).encode()))
    body = json.dumps({"error": message}).encode()
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class HttpGate:
    """ASGI layer for HTTP: the per-client rate, then the body limit, before the app sees the request."""

    def __init__(self, app: ASGIApp, bounds: Bounds, clients: Buckets) -> None:
        self.app = app
        self.max_body = bounds.max_body_bytes
        self.clients = clients

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse what is over a limit; hand the app the request with its body already read."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith(_LIMITED_PREFIXES):
            wait = self.clients.take(client_key(scope))
            if wait:
                await refuse(send, 429, "too many requests from this address; retry later", wait=wait)
                return
        declared = _content_length(scope)
        if declared is None:
            await refuse(send, 400, "Content-Length must be one non-negative integer")
            return
        if declared > self.max_body:
            await refuse(send, 413, self._too_large())
            return
        if scope["method"] in {"GET", "HEAD"} and declared == 0 and not _chunked(scope):
            await self.app(scope, receive, send)
            return
        body = await self._read(receive, send)
        if body is not None:
            await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive, send: Send) -> bytes | None:
        """The whole body, counted as it streams in; None once refused (413) or the client left."""
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body:
                await refuse(send, 413, self._too_large())
                return None
            if not message.get("more_body", False):
                return bytes(body)

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_body} bytes"


def _content_length(scope: Scope) -> int | None:
    """The declared length (0 when absent); None when malformed or given twice with different values."""
    values = {v.strip() for k, v in scope["headers"] if k == b"content-length"}
    if not values:
        return 0
    if len(values) != 1:
        return None
    raw = values.pop()
    return int(raw) if raw.isdigit() and raw.isascii() else None


def _chunked(scope: Scope) -> bool:
    return any(k == b"transfer-encoding" for k, _ in scope["headers"])


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands over the body read already, then waits on the real one (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def header_deadline_protocol(deadline: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request head is not in within ``deadline`` seconds.

    Armed when the connection opens and after each response; a request under
    way (or a connection upgraded to a websocket, which has its own deadline
    for the auth message) is left alone.
    """

    class HeaderDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm(max(deadline, self.timeout_keep_alive))  # an idle keep-alive may wait as uvicorn lets it

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self, seconds: float = deadline) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(seconds, self._expire)

        def _expire(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return  # closed, or now a websocket
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being served
            self.transport.close()

    return HeaderDeadline
