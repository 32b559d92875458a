"""The "your defaults changed" notice goes through the dispatcher: a notification with a status timeline."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
from belfry import rpc, service
from belfry.api.common.v1 import common_pb2
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.dispatcher.v1 import dispatcher_pb2_grpc
from belfry.api.preferences.v1 import preferences_pb2, preferences_pb2_grpc
from belfry.auth import TokenIssuer

from services.dispatcher.server import build_for as dispatcher_build
from services.dispatcher.settings import load_settings as dispatcher_settings
from services.preferences.server import build_for as preferences_build
from services.preferences.settings import load_settings as preferences_settings
from tests.conftest import client_tls, common_env, fanned_out, fresh_database, open_pool

NO_TLS = client_tls()


@dataclass
class Pair:
    pool: asyncpg.Pool
    directory: directory_pb2_grpc.DirectoryServiceStub
    preferences: preferences_pb2_grpc.PreferencesServiceStub
    dispatcher: dispatcher_pb2_grpc.DispatcherServiceStub
    issuer: TokenIssuer


@pytest.fixture(scope="module")
async def pair(admin_dsn: str, token_keys: dict[str, bytes]) -> AsyncIterator[Pair]:
    """Preferences and the dispatcher, each knowing the other, on a database of their own.

    Its own database: every preferences replica drains the notices, and the
    session's others do not know this dispatcher.
    """
    with socket.socket() as probe:  # the dispatcher's port, known before preferences starts
        probe.bind(("127.0.0.1", 0))
        dispatcher_address = f"127.0.0.1:{probe.getsockname()[1]}"
    async with fresh_database(admin_dsn) as url, open_pool(url) as pool:
        prefs_env = preferences_settings(
            common_env(url, token_keys, identity="preferences", BELFRY_DISPATCHER_ADDRESS=dispatcher_address)
        )
        prefs = await service.start("preferences", prefs_env.common, preferences_build(prefs_env))
        prefs_address = f"127.0.0.1:{prefs.port}"
        disp_env = dispatcher_settings(
            common_env(
                url,
                token_keys,
                identity="dispatcher",
                BELFRY_GRPC_ADDRESS=dispatcher_address,
                BELFRY_PREFERENCES_ADDRESS=prefs_address,
            )
        )
        disp = await service.start("dispatcher", disp_env.common, dispatcher_build(disp_env))
        prefs_channel = rpc.connect(prefs_address, NO_TLS)
        disp_channel = rpc.connect(dispatcher_address, NO_TLS)
        try:
            yield Pair(
                pool,
                directory_pb2_grpc.DirectoryServiceStub(prefs_channel),
                preferences_pb2_grpc.PreferencesServiceStub(prefs_channel),
                dispatcher_pb2_grpc.DispatcherServiceStub(disp_channel),
                TokenIssuer(token_keys, "k1"),
            )
        finally:
            await disp_channel.close()
            await prefs_channel.close()
            await disp.stop(0.1)
            await prefs.stop(0.1)


async def test_a_default_change_is_published_and_followed_like_any_notification(pair: Pair, account_id: str) -> None:
    account = directory_pb2.Account(account_id=account_id, name="Acme", tier=directory_pb2.TIER_ENTERPRISE)
    await pair.directory.UpsertAccount(directory_pb2.UpsertAccountRequest(account=account))
    for user_id, locale, admin in (("boss", "en", True), ("ana", "fr-FR", False)):
        user = directory_pb2.User(
            account_id=account_id,
            user_id=user_id,
            email=f"{user_id}@example.test",
            display_name=user_id.title(),
            locale=locale,
            time_zone="Europe/Paris",
            permission_set="sales",
            super_admin=admin,
            active=True,
        )
        await pair.directory.UpsertUser(directory_pb2.UpsertUserRequest(user=user))
    off = preferences_pb2.Choice(topic="tickets.ticket_assigned", channel=common_pb2.CHANNEL_EMAIL, enabled=False)
    await pair.preferences.SetAccountDefaults(
        preferences_pb2.SetAccountDefaultsRequest(choices=[off]),
        metadata=[("authorization", f"Bearer {pair.issuer.issue(account_id, 'boss')}")],
    )

    async def published() -> list[pb.Notification]:
        while True:
            found = await pair.dispatcher.ListNotifications(
                pb.ListNotificationsRequest(account_id=account_id, user_id="ana")
            )
            if found.notifications:
                return list(found.notifications)
            await asyncio.sleep(0.02)  # the handoff is drained by another task: poll briefly

    (listed,) = await asyncio.wait_for(published(), 30)
    await fanned_out(pair.pool, account_id)
    got = await pair.dispatcher.GetNotification(
        pb.GetNotificationRequest(account_id=account_id, notification_id=listed.notification_id)
    )
    notice = got.notification
    assert notice.topic == "account.preferences_changed" and not notice.actor.user_id
    assert notice.object.url.endswith("/settings")
    (ana,) = [r for r in notice.recipients if r.user_id == "ana"]
    assert ana.state == pb.STATE_ACCEPTED
    assert {c.channel: c.state for c in ana.channels}[common_pb2.CHANNEL_EMAIL] == pb.STATE_ACCEPTED
    (email,) = ana.deliveries
    assert email.queue_channel == "email" and email.timeline[-1].state == pb.STATE_QUEUED
    row = await pair.pool.fetchrow(
        "select payload->>'title' as title, payload->>'locale' as locale from queue.whole_deliveries"
        " where account_id = $1 and user_id = 'ana' and channel = 'email'",
        account_id,
    )
    # The title is the topic's French label, then the changed topics in French.
    assert (
        row is not None
        and row["locale"] == "fr"
        and row["title"].startswith("Vos préférences de notification par défaut")
    )
    handoffs = await pair.pool.fetch(
        "select user_id, state from queue.deliveries where account_id = $1 and channel = 'dispatcher'", account_id
    )
    assert sorted((r["user_id"], r["state"]) for r in handoffs) == [("ana", "sent"), ("boss", "sent")]
