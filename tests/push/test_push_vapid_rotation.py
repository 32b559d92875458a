"""The VAPID key rotates without downtime while pushes flow (issue 17, section 5).

The fake push service binds each subscription to the key it was made with
and refuses a push signed with another (as FCM and autopush do), so a
subscription must be signed with its own key for as long as it lives.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from belfry import service
from belfry.api.webpush.v1 import webpush_pb2 as pb
from belfry.api.webpush.v1 import webpush_pb2_grpc as pb_grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.webpush.server import build_for
from services.webpush.settings import load_settings
from services.webpush.vapid import b64url
from tests.conftest import acting_channel, common_env, fresh_database, open_pool
from tests.push.conftest import enqueue_message, message, push_port, token_for
from tests.push.fakes.push_service import BrowserSubscription, PushService
from tests.push.fakes.tls import Pki


def _pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _public(key: ec.EllipticCurvePrivateKey) -> str:
    return b64url(
        key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )


@pytest.fixture
async def own_database(admin_dsn: str) -> AsyncIterator[tuple[str, asyncpg.Pool]]:
    """A database of this test's own: no other web push sender (with other keys) claims its deliveries."""
    async with fresh_database(admin_dsn) as url, open_pool(url) as pool:
        yield url, pool


async def test_the_vapid_key_rotates_while_pushes_flow(
    own_database: tuple[str, asyncpg.Pool],
    token_keys: dict[str, bytes],
    pki: Pki,
    push_service: PushService,
    account_id: str,
    tmp_path: Path,
) -> None:
    database_url, pool = own_database
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "old.pem").write_text(_pem(old))

    async def start(current: ec.EllipticCurvePrivateKey, *others: ec.EllipticCurvePrivateKey) -> service.Running:
        env = common_env(
            database_url,
            token_keys,
            BELFRY_WEBPUSH_ALLOWED_HOSTS="localhost",
            BELFRY_WEBPUSH_ALLOWED_PORTS=str(push_port(push_service)),
            BELFRY_WEBPUSH_ALLOW_NETWORKS="127.0.0.0/8",
            BELFRY_WEBPUSH_CA_FILE=str(pki.ca_file),
            BELFRY_VAPID_PRIVATE_KEY=_pem(current).replace("\n", "\\n"),
            # The old key as a file, the new one inline: both ways are read.
            BELFRY_VAPID_OTHER_KEY_FILES=str(tmp_path / "old.pem") if old in others else "",
            BELFRY_VAPID_OTHER_KEYS=_pem(new) if new in others else "",
            BELFRY_WEBPUSH_LEASE_SECONDS="5",
        )
        settings = load_settings(env)
        return await service.start("webpush", settings.common, build_for(settings))

    async def register(running: service.Running, user: str, sub: BrowserSubscription) -> None:
        """What the page does: subscribe with the key GetVapidPublicKey names, then register."""
        async with acting_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.WebPushStub(channel)
            request = pb.RegisterSubscriptionRequest(
                endpoint=sub.endpoint,
                p256dh=sub.p256dh,
                auth=b64url(sub.auth),
                application_server_key=sub.application_server_key,
            )
            await stub.RegisterSubscription(request, metadata=token_for(token_keys, account_id, user))

    async def served_key(running: service.Running) -> str:
        async with acting_channel(f"127.0.0.1:{running.port}") as channel:
            reply = await pb_grpc.WebPushStub(channel).GetVapidPublicKey(pb.GetVapidPublicKeyRequest())
        return str(reply.public_key)

    running = [await start(old)]
    assert await served_key(running[0]) == _public(old)
    before = push_service.subscribe(application_server_key=_public(old))
    await register(running[0], "u1", before)
    enqueued: list[str] = []
    users = ["u1"]
    flowing = True

    async def produce() -> None:
        while flowing:
            for user in list(users):
                msg = message(account_id, user)
                await enqueue_message(pool, "browser", msg)
                enqueued.append(msg.notification_id)
            await asyncio.sleep(0.02)

    producer = asyncio.ensure_future(produce())
    try:
        # Step 1: the new key is held everywhere but not handed out yet (new replica first).
        running.append(await start(old, new))
        await running.pop(0).stop(0.5)
        assert await served_key(running[0]) == _public(old)
        # Step 2: new subscriptions get the new key; the old one still signs for the old subscription.
        running.append(await start(new, old))
        await running.pop(0).stop(0.5)
        assert await served_key(running[0]) == _public(new)
        after = push_service.subscribe(application_server_key=_public(new))
        await register(running[0], "u2", after)
        users.append("u2")
        # A subscription claiming a key the service does not hold is refused.
        stranger = push_service.subscribe(application_server_key=_public(ec.generate_private_key(ec.SECP256R1())))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await register(running[0], "u3", stranger)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The first browser comes back, sees its subscription bound to the old key, and subscribes again.
        again = push_service.subscribe(application_server_key=_public(new))
        await register(running[0], "u1", again)
        async with acting_channel(f"127.0.0.1:{running[0].port}") as channel:
            stub = pb_grpc.WebPushStub(channel)
            meta = token_for(token_keys, account_id, "u1")
            subs = (await stub.ListSubscriptions(pb.ListSubscriptionsRequest(), metadata=meta)).subscriptions
            gone = next(s.subscription_id for s in subs if s.endpoint == before.endpoint)
            await stub.DeleteSubscription(pb.DeleteSubscriptionRequest(subscription_id=gone), metadata=meta)
        # Step 3: nothing is bound to the old key any more: it is dropped.
        running.append(await start(new))
        await running.pop(0).stop(0.5)
        seen = len(push_service.received)
        while len(push_service.received) < seen + 4:  # noqa: ASYNC110 - the fake has no event per push
            await asyncio.sleep(0.02)
    finally:
        flowing = False
        await producer
    try:
        async with asyncio.timeout(60):  # a hang guard
            while await pool.fetchval(  # noqa: ASYNC110 - deliveries settle in the database
                "select count(*) from queue.deliveries where account_id = $1 and state in ('queued', 'leased')",
                account_id,
            ):
                await asyncio.sleep(0.02)
    finally:
        for replica in running:
            with contextlib.suppress(Exception):
                await replica.stop(0.5)
    states = await pool.fetch(
        "select state, count(*) from queue.deliveries where account_id = $1 group by state", account_id
    )
    assert {r["state"]: r["count"] for r in states} == {"sent": len(enqueued)}
    mine = {before.sub_id, after.sub_id, again.sub_id}
    refusals = [r for r in push_service.rejected if "VAPID" in r]
    assert refusals == [], refusals
    reached = {r.sub_id for r in push_service.received if r.sub_id in mine}
    assert reached == mine  # the old subscription (old key), the new ones (new key)
