"""Batching tests: the real preferences service and batching replicas in-process on port 0.

Both services read one manual clock, so a test moves a week forward without
sleeping. Tests act as the dispatcher: they enqueue handoffs on the
``batching`` queue channel and read what batching enqueued for the senders.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import asyncpg
import grpc
import pytest
from belfry import handoff, rpc, service
from belfry.api.batching.v1 import batching_pb2_grpc
from belfry.api.common.v1 import common_pb2
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.api.preferences.v1 import preferences_pb2, preferences_pb2_grpc
from belfry.auth import TokenIssuer
from belfry.handoff import Assignment, DigestFact
from belfry.message import Item, Message
from belfry.queue import NewDelivery, enqueue

from services.batching.clock import ManualClock
from services.batching.server import build_for as batching_build_for
from services.batching.settings import load_settings as batching_settings
from services.preferences.server import build_for as prefs_build_for
from services.preferences.settings import load_settings as prefs_settings
from tests.conftest import client_tls, common_env, fresh_database, open_pool

TOPICS = {
    "contact": "contacts.contact_assigned",
    "company": "contacts.company_assigned",
    "deal": "deals.deal_assigned",
    "ticket": "tickets.ticket_assigned",
}
# Manual clocks start at the real time: queue rows expire by the database's clock.
START = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)


class SharedClock:
    """The clock both services read; each test installs its own manual clock."""

    def __init__(self) -> None:
        self.current = ManualClock(START)

    def now(self) -> dt.datetime:
        """What the installed manual clock says."""
        return self.current.now()


@dataclass
class Prefs:
    """The preferences service: directory and user settings, as the tests seed them."""

    prefs: preferences_pb2_grpc.PreferencesServiceStub
    directory: directory_pb2_grpc.DirectoryServiceStub
    issuer: TokenIssuer
    address: str

    def auth(self, account_id: str, user_id: str) -> tuple[tuple[str, str]]:
        """Metadata with the user's token."""
        return (("authorization", f"Bearer {self.issuer.issue(account_id, user_id)}"),)

    async def account(self, account_id: str) -> None:
        """An enterprise account."""
        await self.directory.UpsertAccount(
            directory_pb2.UpsertAccountRequest(
                account=directory_pb2.Account(account_id=account_id, name="Acme", tier=directory_pb2.TIER_ENTERPRISE)
            )
        )

    async def user(self, account_id: str, user_id: str, *, time_zone: str = "Europe/Paris", locale: str = "en") -> None:
        """An active user."""
        user = directory_pb2.User(
            account_id=account_id,
            user_id=user_id,
            email=f"{user_id}@example.test",
            display_name=user_id.title(),
            locale=locale,
            time_zone=time_zone,
            permission_set="sales",
            active=True,
        )
        await self.directory.UpsertUser(directory_pb2.UpsertUserRequest(user=user))

    async def opt_in(self, account_id: str, user_id: str, topic: str) -> None:
        """Switch the digest topic's email on (digests are opt-in)."""
        choice = preferences_pb2.Choice(topic=topic, channel=common_pb2.CHANNEL_EMAIL, enabled=True)
        await self.prefs.SetPreference(
            preferences_pb2.SetPreferenceRequest(choice=choice), metadata=self.auth(account_id, user_id)
        )

    async def quiet_hours(self, account_id: str, user_id: str, start: str, end: str) -> None:
        """Quiet hours every day from ``start`` to ``end`` (user-local)."""
        meta = self.auth(account_id, user_id)
        current = await self.prefs.GetPreferences(preferences_pb2.GetPreferencesRequest(), metadata=meta)
        settings = preferences_pb2.ChannelSettings()
        settings.CopyFrom(current.settings)
        settings.quiet_hours.CopyFrom(
            preferences_pb2.QuietHours(enabled=True, days=[1, 2, 3, 4, 5, 6, 7], start=start, end=end)
        )
        await self.prefs.UpdateSettings(preferences_pb2.UpdateSettingsRequest(settings=settings), metadata=meta)


@dataclass
class World:
    """Everything a batching test needs: clock, preferences, replicas, helpers."""

    pool: asyncpg.Pool
    clock: ManualClock
    prefs: Prefs
    env: dict[str, str]
    shared: SharedClock
    replicas: list[service.Running] = field(default_factory=list)
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    async def start_replica(self, **extra: str) -> service.Running:
        """One more batching replica on the same database and clock."""
        settings = batching_settings({**self.env, **extra})
        running = await service.start("batching", settings.common, batching_build_for(settings, clock=self.clock))
        self.replicas.append(running)
        return running

    def stub(self, running: service.Running) -> batching_pb2_grpc.BatchingServiceStub:
        """A client of a replica's operator API."""
        channel = rpc.connect(f"127.0.0.1:{running.port}", client_tls())
        self.channels.append(channel)
        return batching_pb2_grpc.BatchingServiceStub(channel)

    async def handoff(self, account_id: str, user_id: str, item: Assignment | DigestFact) -> None:
        """Enqueue a handoff on the batching channel, as the dispatcher does.

        An assignment travels under its message's notification id (the dispatcher's
        notification), so batching's record of it names that notification.
        """
        nid = uuid.UUID(item.message.notification_id) if isinstance(item, Assignment) else uuid.uuid4()
        async with self.pool.acquire() as conn:
            await enqueue(
                cast(asyncpg.Connection, conn),
                [
                    NewDelivery(
                        account_id=account_id,
                        notification_id=nid,
                        user_id=user_id,
                        channel="batching",
                        topic=item.message.topic if isinstance(item, Assignment) else item.topic,
                        payload=handoff.to_payload(item),
                        expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(days=30),
                    )
                ],
            )

    def assignment(
        self,
        account_id: str,
        user_id: str,
        object_id: str,
        *,
        object_type: str = "contact",
        actor: str = "boss",
        channels: tuple[str, ...] = ("email", "bell"),
        at: dt.datetime | None = None,
        locale: str = "en",
        ttl: dt.timedelta = dt.timedelta(days=1),
    ) -> Assignment:
        """One assignment handoff, as the dispatcher renders it."""
        when = at or self.clock.now()
        url = f"https://app.example.test/{object_type}s/{object_id}"
        name = f"{object_type.title()} {object_id}"
        message = Message(
            notification_id=str(uuid.uuid4()),
            account_id=account_id,
            user_id=user_id,
            topic=TOPICS[object_type],
            title=f"{name} was assigned to you",
            body=name,
            url=url,
            occurred_at=when.isoformat(),
            actor_user_id=actor,
            recipient_email=f"{user_id}@example.test",
            popup=True,
            sound="chime",
            locale=locale,
            items=(Item(object_type, object_id, name, url),),
        )
        return Assignment(
            message=message,
            channels=channels,
            object_type=object_type,
            object_id=object_id,
            assigned_at=when.isoformat(),
            expires_at=(dt.datetime.now(dt.UTC) + ttl).isoformat(),
        )

    async def until(self, check: Callable[[], Awaitable[Any]], what: str, patience: float = 15.0) -> Any:
        """Wait for ``check()`` to return something truthy (the services work in the background)."""
        deadline = asyncio.get_running_loop().time() + patience
        while True:
            result = await check()
            if result:
                return result
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"gave up waiting for {what}")
            await asyncio.sleep(0.02)

    async def deliveries(self, account_id: str, *, channel: str | None = None) -> list[asyncpg.Record]:
        """What batching enqueued for the senders of ``account_id``."""
        return await self.pool.fetch(
            """
            select * from queue.whole_deliveries
            where account_id = $1 and channel <> 'batching' and ($2::text is null or channel = $2)
            order by delivery_id
            """,
            account_id,
            channel,
        )

    async def handled(self, account_id: str) -> bool:
        """Every handoff of the account has been applied (settled)."""
        pending = await self.pool.fetchval(
            "select count(*) from queue.deliveries where account_id = $1 and channel = 'batching'"
            " and state in ('queued', 'leased')",
            account_id,
        )
        return bool(pending == 0)

    async def windows_settled(self, account_id: str) -> bool:
        """No window of the account is due but still open (the closers caught up with the clock)."""
        due = await self.pool.fetchval(
            "select count(*) from batching.windows where account_id = $1 and state = 'open' and closes_at <= $2",
            account_id,
            self.clock.now(),
        )
        return bool(due == 0)

    async def digests_settled(self, account_id: str) -> bool:
        """Every digest subject of the account is scheduled after the clock (the runners caught up)."""
        behind = await self.pool.fetchval(
            "select count(*) from batching.digest_subjects where account_id = $1"
            " and (next_fire_at is null or next_fire_at <= $2)",
            account_id,
            self.clock.now(),
        )
        return bool(behind == 0)


@pytest.fixture(scope="session")
async def shared_clock() -> SharedClock:
    """The clock preferences reads for the whole session."""
    return SharedClock()


@pytest.fixture(scope="session")
async def prefs(
    database_url: str, token_keys: dict[str, bytes], pool: asyncpg.Pool, shared_clock: SharedClock
) -> AsyncIterator[Prefs]:
    """The real preferences service for the session."""
    settings = prefs_settings(common_env(database_url, token_keys))
    running = await service.start("preferences", settings.common, prefs_build_for(settings, clock=shared_clock.now))
    channel = rpc.connect(f"127.0.0.1:{running.port}", client_tls())
    yield Prefs(
        preferences_pb2_grpc.PreferencesServiceStub(channel),
        directory_pb2_grpc.DirectoryServiceStub(channel),
        TokenIssuer(token_keys, "k1"),
        f"127.0.0.1:{running.port}",
    )
    await channel.close()
    await running.stop()


@pytest.fixture
async def world(
    database_url: str, token_keys: dict[str, bytes], pool: asyncpg.Pool, prefs: Prefs, shared_clock: SharedClock
) -> AsyncIterator[World]:
    """A fresh manual clock and a way to start batching replicas; stopped after the test."""
    clock = ManualClock(dt.datetime.now(dt.UTC).replace(second=0, microsecond=0))
    shared_clock.current = clock
    env = common_env(
        database_url,
        token_keys,
        identity="batching",
        BELFRY_PREFERENCES_ADDRESS=prefs.address,
        BELFRY_BATCHING_WINDOW_SECONDS="300",
        BELFRY_BATCHING_TICK_SECONDS="0.05",
        BELFRY_BATCHING_DIGEST_TICK_SECONDS="0.05",
    )
    w = World(pool, clock, prefs, env, shared_clock)
    yield w
    for channel in w.channels:
        await channel.close()
    for running in w.replicas:
        await running.stop()


@pytest.fixture
async def tenant(world: World, account_id: str) -> str:
    """An account with users ana, bob and cy in the directory."""
    await world.prefs.account(account_id)
    for user in ("ana", "bob", "cy"):
        await world.prefs.user(account_id, user)
    return account_id


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
