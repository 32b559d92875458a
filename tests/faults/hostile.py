"""An HTTP/1.1 peer that misbehaves on purpose: absurd ``Retry-After``, slow bodies, resets.

Written on raw asyncio streams rather than a framework so that it can do what
well-behaved servers never do: announce a body and trickle it a few bytes at
a time, or cut the connection with a TCP RST after reading a request. Each
request path gets a scripted behaviour (``routes``, or ``default``); every
request is recorded. With an ``ssl.SSLContext`` it serves HTTPS (the senders
only call ``https`` URLs); offer only ``http/1.1`` in its ALPN.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass, field
from http import HTTPStatus

from tests.faults.proxy import hard_close

# Retry-After values no sane server sends, each of which has stopped a sender before.
ABSURD_RETRY_AFTER = ("99999999999999999999", str(10**12), "garbage", "-5", "1e9")


@dataclass(frozen=True)
class Answer:
    """Answer at once with ``status``, ``headers`` and ``body``."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b"ok"


@dataclass(frozen=True)
class SlowBody:
    """Send the head, then ``size`` body bytes ``chunk`` at a time, ``interval`` seconds apart."""

    status: int = 200
    size: int = 1024
    chunk: int = 1
    interval: float = 0.5


@dataclass(frozen=True)
class Reset:
    """Read the request, then reset the connection (TCP RST) without a byte of answer."""


@dataclass(frozen=True)
class Stall:
    """Read the request and never answer (the connection stays open until the client gives up)."""


Behaviour = Answer | SlowBody | Reset | Stall


def too_many_requests(retry_after: str) -> Answer:
    """A ``429`` carrying ``Retry-After: <retry_after>`` verbatim."""
    return Answer(429, (("retry-after", retry_after),), b"slow down")


@dataclass(frozen=True)
class Request:
    """One request as received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() when it was read


@dataclass
class HostilePeer:
    """``async with HostilePeer(routes={...}) as peer:`` → requests to ``peer.port``."""

    routes: dict[str, Behaviour] = field(default_factory=dict)
    default: Behaviour = field(default_factory=Answer)
    ssl_context: ssl.SSLContext | None = None
    requests: list[Request] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = field(default=None, repr=False)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set, repr=False)
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition, repr=False)

    async def __aenter__(self) -> HostilePeer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            hard_close(writer)
        if self._server is not None:
            await self._server.wait_closed()

    def url(self, path: str, host: str = "localhost") -> str:
        """The peer's URL for ``path``."""
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    def to(self, path: str) -> list[Request]:
        """The requests received for ``path`` so far."""
        return [r for r in self.requests if r.path == path]

    async def wait_for(self, path: str, count: int = 1, within: float = 30.0) -> list[Request]:
        """Until ``count`` requests for ``path`` arrived (a bounded wait, not a timing assertion)."""
        async with asyncio.timeout(within), self._arrived:
            await self._arrived.wait_for(lambda: len(self.to(path)) >= count)
        return self.to(path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                request = await self._read(reader)
                if request is None:
                    return
                async with self._arrived:
                    self.requests.append(request)
                    self._arrived.notify_all()
                behaviour = self.routes.get(request.path, self.default)
                if not await self._answer(behaviour, reader, writer):
                    return
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            return
        finally:
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.close()

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None  # the client closed a kept-alive connection
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return Request(method, path, headers, body, time.time())

    async def _answer(self, behaviour: Behaviour, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Act out ``behaviour``; False when the connection is finished."""
        if isinstance(behaviour, Reset):
            hard_close(writer)
            return False
        if isinstance(behaviour, Stall):
            with contextlib.suppress(OSError):
                await reader.read()  # until the client goes away or the peer closes
            return False
        if isinstance(behaviour, Answer):
            writer.write(_head(behaviour.status, len(behaviour.body), behaviour.headers) + behaviour.body)
            await writer.drain()
            return True
        writer.write(_head(behaviour.status, behaviour.size, ()))
        await writer.drain()
        for sent in range(0, behaviour.size, behaviour.chunk):
            await asyncio.sleep(behaviour.interval)
            if writer.transport.is_closing():
                return False
            writer.write(b"x" * min(behaviour.chunk, behaviour.size - sent))
            await writer.drain()
        return True


def _head(status: int, length: int, headers: tuple[tuple[str, str], ...]) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Whatever"
    lines = [f"HTTP/1.1 {status} {reason}", f"content-length: {length}", "content-type: text/plain"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
