"""The websocket endpoint: authenticate, resume, then stream the user's feed.

Browsers cannot set headers on a websocket, and a token in the URL ends up
in access logs, so the token is the first message. Nothing is sent before it
is verified; a bad Origin is refused before the handshake completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

import asyncpg
from belfry import log
from belfry.auth import Caller, TokenVerifier
from belfry.errors import Unauthenticated
from starlette.websockets import WebSocket, WebSocketDisconnect

from services.gateway import store
from services.gateway.hub import CLOSE_SLOW_CONSUMER, Hub, Tab
from services.gateway.origins import OriginPolicy

_LOG = log.get(__name__)

# Close codes (4000-4999 are the application's own).
CLOSE_UNAUTHENTICATED = 4401
CLOSE_BAD_REQUEST = 4400


@dataclass(frozen=True)
class Limits:
    """Per-connection limits from the settings."""

    auth_timeout: float
    queue_size: int
    resume_limit: int
    send_timeout: float


class Endpoint:
    """Serves ``/ws`` for one gateway replica."""

    def __init__(self, pool: asyncpg.Pool, hub: Hub, verifier: TokenVerifier, origins: OriginPolicy, limits: Limits):
        self.pool = pool
        self.hub = hub
        self.verifier = verifier
        self.origins = origins
        self.limits = limits

    async def handle(self, websocket: WebSocket) -> None:
        """One connection, from handshake to close."""
        if not self.origins.allows(websocket.headers.get("origin"), websocket.headers.get("host")):
            await websocket.close(code=1008)  # before accept: the handshake is refused with 403
            return
        await websocket.accept()
        try:
            first = await asyncio.wait_for(websocket.receive_text(), self.limits.auth_timeout)
            hello = json.loads(first)
            if not isinstance(hello, dict) or hello.get("type") != "auth":
                raise Unauthenticated("the first message must be {'type': 'auth', 'token': ...}")
            caller, expires_at = self.verifier.verify(str(hello.get("token", "")))
        except (TimeoutError, ValueError, Unauthenticated, WebSocketDisconnect) as exc:
            reason = exc.message if isinstance(exc, Unauthenticated) else "authenticate first"
            with contextlib.suppress(Exception):
                await websocket.close(code=CLOSE_UNAUTHENTICATED, reason=reason[:120])
            return
        last_id = hello.get("last_id")
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
                    fresh, expires_at = self.verifier.verify(str(message.get("token", "")))
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
