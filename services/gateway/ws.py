"""The websocket endpoint: authenticate, resume, then stream the user's feed.

Browsers cannot set headers on a websocket, and a token in the URL ends up
in access logs, so the token is the first message. Nothing is sent before it
is verified; a bad Origin is refused before the handshake completes.
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
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

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


class Endpoint:
    """Serves ``/ws`` for one gateway replica."""

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

    async def handle(self, websocket: WebSocket) -> None:
        """One connection, from handshake to close."""
        if not self.origins.allows(websocket.headers.get("origin"), websocket.headers.get("host")):
            await websocket.close(code=1008)  # before accept: the handshake is refused with 403
            return
        client = limits.client_key(websocket.scope)
        try:
            self._admit(client)
        except Refused as refused:
            await _deny(websocket, refused)
            return
        self.sockets += 1
        self.per_client[client] = self.per_client.get(client, 0) + 1
        try:
            await self._connection(websocket)
        finally:
            self.sockets -= 1
            left = self.per_client[client] - 1
            if left:
                self.per_client[client] = left
            else:
                del self.per_client[client]

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

    async def _connection(self, websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            first = await asyncio.wait_for(websocket.receive_text(), self.limits.auth_timeout)
            hello = json.loads(first)
            if not isinstance(hello, dict) or hello.get("type") != "auth":
                raise Unauthenticated("the first message must be {'type': 'auth', 'token': ...}")
            caller, expires_at = await self.verifier.authenticate(str(hello.get("token", "")))
        except (TimeoutError, ValueError, Unauthenticated, WebSocketDisconnect) as exc:
            reason = exc.message if isinstance(exc, Unauthenticated) else "authenticate first"
            with contextlib.suppress(Exception):
                await websocket.close(code=CLOSE_UNAUTHENTICATED, reason=reason[:120])
            return
        last_id = hello.get("last_id")
        cap = self.limits.bounds.max_sockets_per_user
        if len(self.hub.tabs.get((caller.account_id, caller.user_id), ())) >= cap:
            # Counted and joined with no await in between: concurrent tabs of one user cannot both slip in.
            with contextlib.suppress(Exception):
                await websocket.close(code=CLOSE_TOO_MANY_TABS, reason=f"at most {cap} tabs per user on this replica")
            return
        tab = Tab(caller.account_id, caller.user_id, self.limits.queue_size, float(expires_at))
        await self.hub.join(tab)
        try:
            await self._serve(websocket, tab, caller, last_id if isinstance(last_id, int) else None)
        finally:
            tab.stop(1000, "bye")  # cancels the expiry timer
            await self.hub.leave(tab)

    async def _serve(self, websocket: WebSocket, tab: Tab, caller: Caller, last_id: int | None) -> None:
        # Two tasks per connection: this one writes, a second one reads.
        reader = asyncio.ensure_future(self._read(websocket, tab, caller))
        try:
            sent = await self._resume(websocket, tab, last_id)
            while (frame := await tab.next()) is not None:
                feed_id, text = frame
                if 0 < feed_id <= sent:
                    continue  # already sent while resuming
                try:
                    async with asyncio.timeout(self.limits.send_timeout):
                        await websocket.send_text(text)
                except TimeoutError:
                    tab.stop(CLOSE_SLOW_CONSUMER, "too slow: reconnect and resume from your last id")
        except (WebSocketDisconnect, RuntimeError, OSError):
            tab.stop(1000, "closed by the client")
        finally:
            reader.cancel()
        code, reason = tab.closing or (1000, "bye")
        if code == CLOSE_SLOW_CONSUMER:
            _LOG.info("slow consumer disconnected", account_id=tab.account_id, user_id=tab.user_id)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.limits.send_timeout):
                await websocket.close(code=code, reason=reason)

    async def _read(self, websocket: WebSocket, tab: Tab, caller: Caller) -> None:
        """Client messages: token refreshes (same account and user only); a close stops the writer."""
        while True:
            try:
                text = await websocket.receive_text()
            except (WebSocketDisconnect, RuntimeError, KeyError):
                tab.stop(1000, "closed by the client")
                return
            try:
                message: Any = json.loads(text)
            except ValueError:
                tab.stop(CLOSE_BAD_REQUEST, "messages must be JSON")
                return
            if isinstance(message, dict) and message.get("type") == "refresh":
                try:
                    fresh, expires_at = await self.verifier.authenticate(str(message.get("token", "")))
                except Unauthenticated as exc:
                    tab.stop(CLOSE_UNAUTHENTICATED, exc.message[:120])
                    return
                if fresh != caller:
                    tab.stop(CLOSE_UNAUTHENTICATED, "a refreshed token must name the same account and user")
                    return
                tab.expires_at = float(expires_at)
                tab.offer(0, json.dumps({"type": "refreshed", "expires_at": expires_at}))

    async def _resume(self, websocket: WebSocket, tab: Tab, last_id: int | None) -> int:
        """Send what the client missed since ``last_id``; the newest id sent (or known).

        Everything sent here is as of one snapshot of the feed (``store.position``):
        the unread count covers exactly the ids up to ``ready``'s ``last_id``.
        Items committed after it reach the tab live (it joined the hub first).
        """
        now = await store.position(self.pool, tab.account_id, tab.user_id)
        if last_id is None:
            await websocket.send_text(json.dumps({"type": "ready", "last_id": now.last_id, "unread": now.unread}))
            return now.last_id
        if last_id > now.last_id or now.last_id - last_id > self.limits.resume_limit:
            # Too old (or from another database): the client reloads its feed over HTTP.
            await websocket.send_text(json.dumps({"type": "reset", "last_id": now.last_id, "unread": now.unread}))
            return now.last_id
        missed = await store.since(
            self.pool, tab.account_id, tab.user_id, last_id, now.last_id, self.limits.resume_limit
        )
        for item in missed:
            frame = {"type": "item", "item": item.to_json(), "unread": now.unread, "resumed": True}
            await websocket.send_text(json.dumps(frame))
        await websocket.send_text(json.dumps({"type": "ready", "last_id": now.last_id, "unread": now.unread}))
        return now.last_id


async def _deny(websocket: WebSocket, refused: Refused) -> None:
    """Refuse the handshake with an HTTP status and Retry-After (a plain 403 where the server cannot)."""
    response = JSONResponse(
        {"error": refused.message},
        status_code=refused.status,
        headers={"retry-after": limits.retry_after(refused.wait)},
    )
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:  # the server lacks the websocket.http.response extension
        await websocket.close(code=1013)
