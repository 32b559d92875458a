"""The websocket endpoint: authenticate, resume, then stream the user's feed.

Browsers cannot set headers on a websocket, and a token in the URL ends up
in access logs, so the token is the first message. Nothing is sent before it
is verified; a bad Origin is refused before the handshake completes.

An idle tab is the common case, so each is kept small (see the memory per
idle tab in docs/benchmarks.md): the endpoint speaks ASGI directly (no
Starlette ``WebSocket`` per connection), one task per tab (the server's)
reads the client's messages, and a writer task exists only while frames
wait to be sent; the request headers and the auth message are let go once
the tab is authenticated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from belfry import log
from belfry.auth import Caller, TokenVerifier
from belfry.errors import Unauthenticated
from starlette.types import Message, Receive, Scope, Send

from services.gateway import limits, store
from services.gateway.hub import CLOSE_SLOW_CONSUMER, Hub, Tab
from services.gateway.origins import OriginPolicy

_LOG = log.get(__name__)

# Close codes (4000-4999 are the application's own).
CLOSE_UNAUTHENTICATED = 4401
CLOSE_BAD_REQUEST = 4400
CLOSE_TOO_MANY_TABS = 4429


@dataclass(frozen=True)
class Limits:
    """Per-connection limits from the settings."""

    auth_timeout: float
    queue_size: int
    resume_limit: int
    send_timeout: float
    bounds: limits.Bounds = field(default_factory=limits.Bounds)  # socket caps per replica, client address and user


class Refused(Exception):
    """A handshake over a cap: answered with ``status`` (and ``Retry-After``), never upgraded."""

    def __init__(self, status: int, message: str, wait: float) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.wait = wait


class Connection(Tab):
    """A tab on an accepted websocket: its frames are written by a task that exists only while some wait.

    While the tab resumes (``live`` false) frames and a close wait for it;
    then ``_wake`` starts the writer whenever a frame or a reason to close
    arrives. The writer sends the close frame; when even that cannot be
    written in time, it cancels the reading task (``reader``) so the server
    drops the connection.
    """

    __slots__ = ("abandoned", "live", "reader", "send", "send_timeout", "sent", "writer")

    def __init__(self, caller: Caller, expires_at: float, queue_size: int, send: Send, send_timeout: float) -> None:
        super().__init__(caller.account_id, caller.user_id, queue_size, expires_at)
        self.send = send
        self.send_timeout = send_timeout
        self.sent = 0  # the newest feed id sent while resuming: live frames up to it are not sent twice
        self.live = False  # resumed: frames go out as they come (until the close is sent)
        self.abandoned = False  # the writer gave up on a client that does not read: stop reading too
        self.reader: asyncio.Task[Any] | None = None
        self.writer: asyncio.Task[None] | None = None

    def _wake(self) -> None:
        if self.live and self.writer is None:
            self.writer = asyncio.get_running_loop().create_task(self._write())

    def go_live(self, sent: int) -> None:
        """Resumed up to ``sent``: what arrived meanwhile (frames, a close) goes out now."""
        self.sent = sent
        self.live = True
        if self.frames or self.closing is not None:
            self._wake()

    async def _write(self) -> None:
        try:
            while (frame := self.take()) is not None:
                feed_id, text = frame
                if 0 < feed_id <= self.sent:
                    continue  # already sent while resuming
                try:
                    async with asyncio.timeout(self.send_timeout):
                        await self.send({"type": "websocket.send", "text": text})
                except TimeoutError:
                    self.stop(CLOSE_SLOW_CONSUMER, "too slow: reconnect and resume from your last id")
                except (OSError, RuntimeError):  # the client is gone
                    self.live = False
                    self.stop(1000, "closed by the client")
            if self.closing is not None and self.live:
                self.live = False  # one close frame, and no writer after it
                await self._close(*self.closing)
        finally:
            self.writer = None

    async def _close(self, code: int, reason: str) -> None:
        if code == CLOSE_SLOW_CONSUMER:
            _LOG.info("slow consumer disconnected", account_id=self.account_id, user_id=self.user_id)
        try:
            async with asyncio.timeout(self.send_timeout):
                await self.send({"type": "websocket.close", "code": code, "reason": reason})
            return  # the server answers the reader with websocket.disconnect
        except TimeoutError:
            pass  # the client reads nothing, not even the close frame
        except (OSError, RuntimeError):
            return  # gone already: the reader has its websocket.disconnect
        self.abandoned = True
        if self.reader is not None:
            self.reader.cancel()


class Endpoint:
    """Serves ``/ws`` for one gateway replica (an ASGI websocket app)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        hub: Hub,
        verifier: TokenVerifier,
        origins: OriginPolicy,
        limits: Limits,
        clients: limits.Buckets | None = None,
    ):
        self.pool = pool
        self.hub = hub
        self.verifier = verifier
        self.origins = origins
        self.limits = limits
        self.clients = clients  # the per-address request rate, shared with the HTTP API
        self.sockets = 0  # open on this replica, authenticated or not
        self.per_client: dict[str, int] = {}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One connection, from handshake to close.

        The only coroutine of ours suspended while the tab idles: resuming and
        the read loop are inline rather than awaited helpers, as every
        suspended frame costs memory on every idle tab.
        """
        client = self._client(scope)
        if client is None:
            await send({"type": "websocket.close", "code": 1008})  # before accept: the handshake is refused with 403
            return
        try:
            self._admit(client)
        except Refused as refused:
            await _deny(scope, send, refused)
            return
        self.sockets += 1
        self.per_client[client] = self.per_client.get(client, 0) + 1
        try:
            opened = await self._open(scope, receive, send)
            if opened is None:
                return
            tab, last_id = opened
            task = tab.reader = asyncio.current_task()
            try:
                await self.hub.join(tab)  # first thing in it: no await before the user's tabs were counted
                tab.go_live(await self._resume(tab, last_id))
                while (message := await receive())["type"] != "websocket.disconnect":
                    if tab.closing is None:
                        await self._on_message(tab, message)
            except (OSError, RuntimeError):  # the client went away while resuming
                pass
            except asyncio.CancelledError:
                if not tab.abandoned or task is None:
                    raise
                # The writer could not even send the close frame: returning lets the server drop the connection.
                task.uncancel()
            finally:
                tab.reader = None
                tab.live = False  # no writer starts any more
                tab.stop(1000, "closed by the client")
                if tab.writer is not None:
                    await tab.writer
                await self.hub.leave(tab)
        finally:
            self._release(client)

    def _release(self, client: str) -> None:
        self.sockets -= 1
        left = self.per_client[client] - 1
        if left:
            self.per_client[client] = left
        else:
            del self.per_client[client]

    def _client(self, scope: Scope) -> str | None:
        """The client's key for the limits, or None when the Origin is not allowed."""
        origin = host = None
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"host":
                host = value.decode("latin-1")
        return limits.client_key(scope) if self.origins.allows(origin, host) else None

    def _admit(self, client: str) -> None:
        """Raise Refused when the replica or this client address holds its cap, or the address its rate."""
        bounds = self.limits.bounds
        if self.sockets >= bounds.max_sockets:
            raise Refused(503, f"this replica holds its limit of {bounds.max_sockets} connections", 5.0)
        if self.per_client.get(client, 0) >= bounds.max_sockets_per_client:
            raise Refused(
                429, f"this address holds its limit of {bounds.max_sockets_per_client} connections on this replica", 5.0
            )
        wait = self.clients.take(client) if self.clients is not None else 0.0
        if wait:
            raise Refused(429, "too many connections opened from this address; retry later", wait)

    async def _open(self, scope: Scope, receive: Receive, send: Send) -> tuple[Connection, int | None] | None:
        """Accept, then the first message: a verified token within the user's cap makes the tab (None: closed)."""
        if (await receive())["type"] != "websocket.connect":
            return None
        await send({"type": "websocket.accept"})
        # The server keeps the scope for the connection's life; nothing reads the headers again.
        scope["headers"] = []
        try:
            async with asyncio.timeout(self.limits.auth_timeout):
                message = await receive()
            if message["type"] == "websocket.disconnect":
                return None
            hello = json.loads(_text(message))
            if not isinstance(hello, dict) or hello.get("type") != "auth":
                raise Unauthenticated("the first message must be {'type': 'auth', 'token': ...}")
            caller, expires_at = await self.verifier.authenticate(str(hello.get("token", "")))
        except (TimeoutError, ValueError, Unauthenticated) as exc:
            reason = exc.message if isinstance(exc, Unauthenticated) else "authenticate first"
            await _close_quietly(send, CLOSE_UNAUTHENTICATED, reason[:120])
            return None
        cap = self.limits.bounds.max_sockets_per_user
        if len(self.hub.tabs.get((caller.account_id, caller.user_id), ())) >= cap:
            # Counted here and joined by the caller with no await in between: concurrent tabs of one user
            # cannot both slip in.
            await _close_quietly(send, CLOSE_TOO_MANY_TABS, f"at most {cap} tabs per user on this replica")
            return None
        last_id = hello.get("last_id")
        tab = Connection(caller, float(expires_at), self.limits.queue_size, send, self.limits.send_timeout)
        return tab, last_id if isinstance(last_id, int) else None

    async def _on_message(self, tab: Connection, message: Message) -> None:
        """A client message: token refreshes (same account and user only); anything else closes the tab."""
        try:
            request: Any = json.loads(_text(message))
        except ValueError:
            tab.stop(CLOSE_BAD_REQUEST, "messages must be JSON")
            return
        if isinstance(request, dict) and request.get("type") == "refresh":
            try:
                fresh, expires_at = await self.verifier.authenticate(str(request.get("token", "")))
            except Unauthenticated as exc:
                tab.stop(CLOSE_UNAUTHENTICATED, exc.message[:120])
                return
            if (fresh.account_id, fresh.user_id) != tab.key:
                tab.stop(CLOSE_UNAUTHENTICATED, "a refreshed token must name the same account and user")
                return
            tab.expires_at = float(expires_at)
            tab.offer(0, json.dumps({"type": "refreshed", "expires_at": expires_at}))

    async def _resume(self, tab: Connection, last_id: int | None) -> int:
        """Send what the client missed since ``last_id``; the newest id sent (or known).

        Everything sent here is as of one snapshot of the feed (``store.position``):
        the unread count covers exactly the ids up to ``ready``'s ``last_id``.
        Items committed after it reach the tab live (it joined the hub first, and the
        snapshot is read only once the hub listens).
        """
        await self.hub.listening.wait()
        now = await store.position(self.pool, tab.account_id, tab.user_id)
        if last_id is None:
            await _send_text(tab.send, json.dumps({"type": "ready", "last_id": now.last_id, "unread": now.unread}))
            return now.last_id
        if last_id > now.last_id or now.last_id - last_id > self.limits.resume_limit:
            # Too old (or from another database): the client reloads its feed over HTTP.
            await _send_text(tab.send, json.dumps({"type": "reset", "last_id": now.last_id, "unread": now.unread}))
            return now.last_id
        missed = await store.since(
            self.pool, tab.account_id, tab.user_id, last_id, now.last_id, self.limits.resume_limit
        )
        for item in missed:
            frame = {"type": "item", "item": item.to_json(), "unread": now.unread, "resumed": True}
            await _send_text(tab.send, json.dumps(frame))
        await _send_text(tab.send, json.dumps({"type": "ready", "last_id": now.last_id, "unread": now.unread}))
        return now.last_id


def _text(message: Message) -> str:
    """A received message's text (ValueError: a binary message or no message at all)."""
    text = message.get("text")
    if message["type"] != "websocket.receive" or not isinstance(text, str):
        raise ValueError("expected a text message")
    return text


async def _send_text(send: Send, text: str) -> None:
    await send({"type": "websocket.send", "text": text})


async def _close_quietly(send: Send, code: int, reason: str) -> None:
    """Close an accepted websocket; a client already gone is no error."""
    with contextlib.suppress(OSError, RuntimeError):
        await send({"type": "websocket.close", "code": code, "reason": reason})


async def _deny(scope: Scope, send: Send, refused: Refused) -> None:
    """Refuse the handshake with an HTTP status and Retry-After (a plain 403 where the server cannot)."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1013})
        return
    body = json.dumps({"error": refused.message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", limits.retry_after(refused.wait).encode()),
    ]
    await send({"type": "websocket.http.response.start", "status": refused.status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})
