"""Gateway fixtures: real replicas (gRPC + HTTP on port 0) and a helper that publishes through the bell queue."""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
import websockets
from belfry import service
from belfry.auth import TokenIssuer
from belfry.message import Item, Message
from belfry.queue import NewDelivery, enqueue
from playwright.async_api import Browser, BrowserContext

from services.gateway import server, settings
from tests.conftest import common_env, fresh_database, open_pool
from tests.gateway import browser as b


class Replica:
    """A started gateway replica."""

    def __init__(self, running: service.Running, build: server.GatewayBuild) -> None:
        self.running = running
        self.build = build

    @property
    def http(self) -> str:
        """Base URL of the HTTP server."""
        return f"http://127.0.0.1:{self.build.http_port}"

    @property
    def ws(self) -> str:
        """The websocket URL."""
        return f"ws://127.0.0.1:{self.build.http_port}/ws"


StartReplica = Callable[..., Awaitable[Replica]]


@pytest.fixture
async def start_replica(database_url: str, token_keys: dict[str, bytes]) -> AsyncIterator[StartReplica]:
    """Start gateway replicas with optional extra settings; all are stopped at the end."""
    started: list[Replica] = []

    async def start(**extra: str) -> Replica:
        defaults = {
            "BELFRY_GATEWAY_HTTP_HOST": "127.0.0.1",
            "BELFRY_GATEWAY_HTTP_PORT": "0",
            "BELFRY_WORKER_ID": f"gw-{uuid.uuid4().hex[:6]}",
            "BELFRY_GATEWAY_PRESENCE_TTL_SECONDS": "5",
        }
        env = common_env(database_url, token_keys, identity="gateway", **(defaults | extra))
        s = settings.load_settings(env)
        build = server.GatewayBuild(s)
        running = await service.start("gateway", s.common, build)
        replica = Replica(running, build)
        started.append(replica)
        return replica

    yield start
    for replica in started:
        await replica.running.stop(0.2)


@pytest.fixture
async def replica(start_replica: StartReplica) -> Replica:
    """One gateway replica with default settings."""
    return await start_replica()


@pytest.fixture
def issuer(token_keys: dict[str, bytes]) -> TokenIssuer:
    """Issues user tokens with the active test key."""
    return TokenIssuer(token_keys, "k1")


Publish = Callable[..., Awaitable[str]]


@pytest.fixture
def publish(pool: asyncpg.Pool) -> Publish:
    """Enqueue one bell delivery the way the dispatcher does; returns the notification id."""

    async def send(account_id: str, user_id: str, title: str = "hello", **fields: Any) -> str:
        notification_id = str(uuid.uuid4())
        items = tuple(Item(**i) for i in fields.pop("items", ()))
        message = Message(
            notification_id=notification_id,
            account_id=account_id,
            user_id=user_id,
            topic=fields.pop("topic", "conversation.mentioned"),
            title=title,
            body=fields.pop("body", "body"),
            url=fields.pop("url", "https://app.example/x"),
            occurred_at=datetime.datetime.now(datetime.UTC).isoformat(),
            items=items,
            **fields,
        )
        async with pool.acquire() as conn, conn.transaction():
            await enqueue(
                conn,
                [
                    NewDelivery(
                        account_id=account_id,
                        notification_id=uuid.UUID(notification_id),
                        user_id=user_id,
                        channel="bell",
                        topic=message.topic,
                        payload=message.to_json(),
                        expires_at=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1),
                    )
                ],
            )
        return notification_id

    return send


async def connect(url: str, token: str, last_id: int | None = None, **kwargs: Any) -> websockets.ClientConnection:
    """Open a websocket and authenticate with ``token``."""
    ws = await websockets.connect(url, **kwargs)
    await ws.send(json.dumps({"type": "auth", "token": token, "last_id": last_id}))
    return ws


async def frames_until(ws: websockets.ClientConnection, kind: str) -> list[dict[str, Any]]:
    """Read frames up to and including the first of type ``kind``."""
    seen: list[dict[str, Any]] = []
    while True:
        frame = json.loads(await ws.recv())
        seen.append(frame)
        if frame["type"] == kind:
            return seen


# This area runs senders, which claim every due row of their channel: it gets a
# database of its own so rows written by other areas' tests never reach them.
@pytest.fixture(scope="session")
async def database_url(admin_dsn: str) -> AsyncIterator[str]:
    """This area's own freshly migrated database."""
    async with fresh_database(admin_dsn) as url:
        yield url


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on this area's database."""
    async with open_pool(database_url) as p:
        yield p


# The browser tests' fixtures (test_gateway_browser.py, test_gateway_web_app.py).
@pytest.fixture(scope="session")
async def chromium() -> AsyncIterator[Browser]:
    """One browser for the session (a fresh context per test)."""
    async for browser in b.launch():
        yield browser


@pytest.fixture(scope="session")
async def preferences(database_url: str, token_keys: dict[str, bytes]) -> AsyncIterator[service.Running]:
    """The preferences service behind the settings pages."""
    running = await b.start_preferences(database_url, token_keys)
    yield running
    await running.stop(0.2)


@pytest.fixture
async def web(start_replica: StartReplica, preferences: service.Running, account_id: str) -> Replica:
    """A gateway replica wired to the preferences service, with the test user in the directory."""
    await b.seed_user(preferences.port, account_id, "u1", super_admin=True)
    return await start_replica(BELFRY_PREFERENCES_ADDRESS=f"127.0.0.1:{preferences.port}")


@pytest.fixture
async def context(chromium: Browser, web: Replica) -> AsyncIterator[BrowserContext]:
    """A fresh browser profile allowed to show notifications on the app's origin."""
    ctx = await chromium.new_context()
    await ctx.grant_permissions(["notifications"], origin=web.http)
    yield ctx
    await ctx.close()
