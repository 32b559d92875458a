"""The real preferences service and the dispatcher, in-process on port 0, one pair per session.

Each test seeds its own account (fresh id) through the real directory API.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import asyncpg
import grpc
import pytest
from belfry import rpc, service
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.dispatcher.v1 import dispatcher_pb2_grpc
from belfry.api.preferences.v1 import preferences_pb2_grpc

from services.dispatcher.server import build_for as dispatcher_build
from services.dispatcher.settings import load_settings as dispatcher_settings
from services.preferences.server import build_for as preferences_build
from services.preferences.settings import load_settings as preferences_settings
from tests.conftest import client_tls, common_env, fanned_out, fresh_database, open_pool

# The preferences service's clock is pinned, so quiet hours are decided at a known instant.
PINNED_NOW = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
# Plaintext, presenting the test caller's service token (every role but the services' own).
NO_TLS = client_tls()


@dataclass
class Mesh:
    """Stubs of the running services and the session's database pool."""

    dispatcher: dispatcher_pb2_grpc.DispatcherServiceStub
    directory: directory_pb2_grpc.DirectoryServiceStub
    preferences: preferences_pb2_grpc.PreferencesServiceStub
    pool: asyncpg.Pool
    dispatcher_port: int
    preferences_address: str
    database_url: str


@pytest.fixture(scope="session")
async def mesh(database_url: str, token_keys: dict[str, bytes], pool: asyncpg.Pool) -> AsyncIterator[Mesh]:
    """Preferences (with a pinned clock) and the dispatcher, talking over real gRPC."""
    prefs = await service.start(
        "preferences",
        preferences_settings(common_env(database_url, token_keys)).common,
        preferences_build(preferences_settings(common_env(database_url, token_keys)), clock=lambda: PINNED_NOW),
    )
    address = f"127.0.0.1:{prefs.port}"
    settings = dispatcher_settings(
        common_env(
            database_url,
            token_keys,
            identity="dispatcher",
            BELFRY_PREFERENCES_ADDRESS=address,
            BELFRY_DB_POOL_MAX="8",
            # Tests plant fan-out rows minutes old (backpressure, held events): this shared replica must not
            # refuse the tests that run while one of those is in place.
            BELFRY_DISPATCHER_MAX_FANOUT_LAG_SECONDS="600",
        )
    )
    disp = await service.start("dispatcher", settings.common, dispatcher_build(settings))
    prefs_channel = rpc.connect(address, NO_TLS)
    disp_channel = rpc.connect(f"127.0.0.1:{disp.port}", NO_TLS)
    yield Mesh(
        dispatcher=dispatcher_pb2_grpc.DispatcherServiceStub(disp_channel),
        directory=directory_pb2_grpc.DirectoryServiceStub(prefs_channel),
        preferences=preferences_pb2_grpc.PreferencesServiceStub(prefs_channel),
        pool=pool,
        dispatcher_port=disp.port,
        preferences_address=address,
        database_url=database_url,
    )
    await disp_channel.close()
    await prefs_channel.close()
    await disp.stop(0.1)
    await prefs.stop(0.1)


# user id, display name, locale, tool access
USERS = (
    ("ana", "Ana Lopez", "en", ()),
    ("ben", "Ben Okafor", "en", ("conversations_inbox",)),
    ("chloe", "Chloé Martin", "fr", ("forms",)),
    ("dan", "Dan Wu", "en", ()),
)


async def seed(mesh: Mesh, account_id: str, users: Sequence[tuple[str, str, str, tuple[str, ...]]] = USERS) -> None:
    """Create an enterprise account and its users in the directory."""
    await mesh.directory.UpsertAccount(
        directory_pb2.UpsertAccountRequest(
            account=directory_pb2.Account(account_id=account_id, name="Test", tier=directory_pb2.TIER_ENTERPRISE)
        )
    )
    for user_id, name, locale, tools in users:
        await mesh.directory.UpsertUser(
            directory_pb2.UpsertUserRequest(
                user=directory_pb2.User(
                    account_id=account_id,
                    user_id=user_id,
                    email=f"{user_id}@example.test",
                    display_name=name,
                    locale=locale,
                    time_zone="UTC",
                    permission_set="sales",
                    tool_access=list(tools),
                    active=True,
                )
            )
        )


def event(account_id: str, topic: str = "deals.stage_changed", **fields: object) -> pb.Event:
    """An event with sensible defaults; ``fields`` override them."""
    ev = pb.Event(
        account_id=account_id,
        topic=topic,
        actor=pb.Actor(user_id="dan", source=pb.ACTOR_SOURCE_UI),
        object=pb.ObjectRef(type="deal", id="D-1", display_name="Big <b>deal</b>", url="https://app.example/deals/1"),
        idempotency_key=uuid.uuid4().hex,
    )
    ev.occurred_at.GetCurrentTime()
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(ev, name).extend(value)
        elif name in {"actor", "object", "variables", "occurred_at"}:
            getattr(ev, name).CopyFrom(value)
        else:
            setattr(ev, name, value)
    return ev


async def deliveries(pool: asyncpg.Pool, account_id: str, notification_id: str) -> list[asyncpg.Record]:
    """The queue rows of one notification (once fan-out has written them)."""
    await fanned_out(pool, account_id)
    return await pool.fetch(
        "select * from queue.whole_deliveries where account_id = $1 and notification_id = $2 order by user_id, channel",
        account_id,
        uuid.UUID(notification_id),
    )


async def publish(mesh: Mesh, ev: pb.Event) -> pb.PublishResponse:
    """Publish one event and wait until it is fanned out (its recipients and deliveries written)."""
    answer: pb.PublishResponse = await mesh.dispatcher.Publish(pb.PublishRequest(event=ev))
    await fanned_out(mesh.pool, ev.account_id)
    return answer


async def refused(call: object) -> grpc.aio.AioRpcError:
    """Await ``call`` and return the error it must raise."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


@pytest.fixture(autouse=True)
async def _leave_the_queue_as_found(account_id: str, pool: asyncpg.Pool) -> AsyncIterator[None]:
    """Remove this test's deliveries afterwards: the session's queue is shared with the
    senders and queue tests that run later, which must not find our rows waiting."""
    yield
    await pool.execute("delete from queue.deliveries where account_id like $1 || '%'", account_id)


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
