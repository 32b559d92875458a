"""No silent takeovers, bounded registrations, bounded fan-out (issue 17, section 4).

A browser endpoint or device token another user of the account registered
stays theirs; subscriptions, devices and webhooks are capped per user; one
delivery reaches a user's endpoints a few at a time.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from belfry import rpc, service, ssrf
from belfry.api.mobile.v1 import mobile_pb2 as mobile_pb
from belfry.api.mobile.v1 import mobile_pb2_grpc as mobile_grpc
from belfry.api.webhooks.v1 import webhooks_pb2 as hooks_pb
from belfry.api.webhooks.v1 import webhooks_pb2_grpc as hooks_grpc
from belfry.api.webpush.v1 import webpush_pb2 as push_pb
from belfry.api.webpush.v1 import webpush_pb2_grpc as push_grpc
from belfry.queue import Sent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.mobile.server import build_for as mobile_build_for
from services.mobile.settings import load_settings as mobile_settings
from services.webhooks import store as hooks_store
from services.webhooks.sender import WebhookSender
from services.webhooks.server import build_for as hooks_build_for
from services.webhooks.settings import load_settings as hooks_settings
from services.webhooks.signing import SecretBox
from tests.conftest import client_tls, common_env
from tests.push.conftest import message, token_for
from tests.push.fakes.http import serve_tls
from tests.push.fakes.push_service import PushService, b64url
from tests.push.fakes.tls import Pki
from tests.push.push_helpers import lease_for

BUNDLE = "com.example.crm"


def _register(sub: object) -> push_pb.RegisterSubscriptionRequest:
    return push_pb.RegisterSubscriptionRequest(
        endpoint=sub.endpoint,  # type: ignore[attr-defined]
        p256dh=sub.p256dh,  # type: ignore[attr-defined]
        auth=b64url(sub.auth),  # type: ignore[attr-defined]
        label="laptop",
    )


async def test_a_push_endpoint_another_user_holds_stays_theirs(
    channel: grpc.aio.Channel,
    push_service: PushService,
    pool: asyncpg.Pool,
    token_keys: dict[str, bytes],
    account_id: str,
) -> None:
    stub = push_grpc.WebPushStub(channel)
    owner, intruder = token_for(token_keys, account_id, "u1"), token_for(token_keys, account_id, "u2")
    sub = push_service.subscribe()
    mine = (await stub.RegisterSubscription(_register(sub), metadata=owner)).subscription
    # The same endpoint with the intruder's own keys: it would receive the owner's notifications.
    stolen = push_service.subscribe()
    attack = push_pb.RegisterSubscriptionRequest(endpoint=sub.endpoint, p256dh=stolen.p256dh, auth=b64url(stolen.auth))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.RegisterSubscription(attack, metadata=intruder)
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "another user" in (refused.value.details() or "")
    assert [
        s.subscription_id
        for s in (await stub.ListSubscriptions(push_pb.ListSubscriptionsRequest(), metadata=owner)).subscriptions
    ] == [mine.subscription_id]
    assert not (await stub.ListSubscriptions(push_pb.ListSubscriptionsRequest(), metadata=intruder)).subscriptions
    row = await pool.fetchrow(
        "select user_id, p256dh, auth from webpush.subscriptions where account_id = $1 and endpoint = $2",
        account_id,
        sub.endpoint,
    )
    assert row is not None
    assert (row["user_id"], row["p256dh"], row["auth"]) == ("u1", sub.p256dh, b64url(sub.auth))
    # The owner may still update their own registration.
    assert (
        await stub.RegisterSubscription(_register(sub), metadata=owner)
    ).subscription.subscription_id == mine.subscription_id


async def test_push_subscriptions_are_capped_per_user(
    channel: grpc.aio.Channel, push_service: PushService, token_keys: dict[str, bytes], account_id: str
) -> None:
    stub = push_grpc.WebPushStub(channel)
    meta = token_for(token_keys, account_id, "u1")
    subs = [push_service.subscribe() for _ in range(21)]
    for sub in subs[:20]:  # the service's default cap
        await stub.RegisterSubscription(_register(sub), metadata=meta)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.RegisterSubscription(_register(subs[20]), metadata=meta)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "at most 20" in (refused.value.details() or "")
    await stub.RegisterSubscription(_register(subs[0]), metadata=meta)  # re-registering one held is no new one
    listed = await stub.ListSubscriptions(push_pb.ListSubscriptionsRequest(), metadata=meta)
    assert len(listed.subscriptions) == 20
    await stub.RegisterSubscription(_register(subs[20]), metadata=token_for(token_keys, account_id, "u2"))


@pytest.fixture(scope="module")
async def mobile(database_url: str, token_keys: dict[str, bytes]) -> AsyncIterator[mobile_grpc.MobileStub]:
    """The mobile service with a small device cap (no providers: registration only)."""
    settings = mobile_settings(
        common_env(database_url, token_keys, identity="mobile", BELFRY_MOBILE_MAX_DEVICES_PER_USER="3")
    )
    running = await service.start("mobile", settings.common, mobile_build_for(settings))
    async with rpc.connect(f"127.0.0.1:{running.port}", client_tls()) as ch:
        yield mobile_grpc.MobileStub(ch)
    await running.stop(0.1)


def _device(token: str) -> mobile_pb.RegisterDeviceRequest:
    return mobile_pb.RegisterDeviceRequest(platform=mobile_pb.PLATFORM_IOS, token=token, app_id=BUNDLE, label="phone")


async def test_a_device_token_another_user_holds_stays_theirs(
    mobile: mobile_grpc.MobileStub, pool: asyncpg.Pool, token_keys: dict[str, bytes], account_id: str
) -> None:
    owner, intruder = token_for(token_keys, account_id, "u1"), token_for(token_keys, account_id, "u2")
    token = secrets.token_hex(32)
    mine = (await mobile.RegisterDevice(_device(token), metadata=owner)).device
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mobile.RegisterDevice(_device(token), metadata=intruder)
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "another user" in (refused.value.details() or "")
    assert [
        d.device_id for d in (await mobile.ListDevices(mobile_pb.ListDevicesRequest(), metadata=owner)).devices
    ] == [mine.device_id]
    assert not (await mobile.ListDevices(mobile_pb.ListDevicesRequest(), metadata=intruder)).devices
    holder = await pool.fetchval(
        "select user_id from mobile.devices where account_id = $1 and token = $2", account_id, token
    )
    assert holder == "u1"


async def test_devices_are_capped_per_user_even_when_registered_at_once(
    mobile: mobile_grpc.MobileStub, token_keys: dict[str, bytes], account_id: str
) -> None:
    meta = token_for(token_keys, account_id, "u1")
    answers = await asyncio.gather(
        *(mobile.RegisterDevice(_device(secrets.token_hex(32)), metadata=meta) for _ in range(8)),
        return_exceptions=True,
    )
    refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(refused) == 5 and {r.code() for r in refused} == {grpc.StatusCode.FAILED_PRECONDITION}
    assert "at most 3" in (refused[0].details() or "")
    assert len((await mobile.ListDevices(mobile_pb.ListDevicesRequest(), metadata=meta)).devices) == 3


@pytest.fixture(scope="module")
async def webhooks(database_url: str, token_keys: dict[str, bytes]) -> AsyncIterator[hooks_grpc.WebhooksStub]:
    """The webhooks service with a small cap, allowed to name loopback URLs."""
    env = common_env(
        database_url,
        token_keys,
        identity="webhooks",
        BELFRY_WEBHOOKS_ALLOW_NETWORKS="127.0.0.0/8",
        BELFRY_WEBHOOK_SECRET_KEY=base64.b64encode(os.urandom(32)).decode(),
        BELFRY_WEBHOOKS_MAX_PER_USER="2",
    )
    settings = hooks_settings(env)
    running = await service.start("webhooks", settings.common, hooks_build_for(settings))
    async with rpc.connect(f"127.0.0.1:{running.port}", client_tls()) as ch:
        yield hooks_grpc.WebhooksStub(ch)
    await running.stop(0.1)


async def test_webhooks_are_capped_per_user(
    webhooks: hooks_grpc.WebhooksStub, token_keys: dict[str, bytes], account_id: str
) -> None:
    meta = token_for(token_keys, account_id, "u1")
    for i in range(2):
        await webhooks.ConnectWebhook(hooks_pb.ConnectWebhookRequest(url=f"https://127.0.0.1/hooks/{i}"), metadata=meta)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await webhooks.ConnectWebhook(hooks_pb.ConnectWebhookRequest(url="https://127.0.0.1/hooks/2"), metadata=meta)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "at most 2" in (refused.value.details() or "")
    assert len((await webhooks.ListWebhooks(hooks_pb.ListWebhooksRequest(), metadata=meta)).webhooks) == 2


class Holding:
    """A webhook receiver that holds every POST until the test releases it, counting those in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.most = 0
        self.done = 0
        self.waiting: list[asyncio.Future[None]] = []
        self.changed = asyncio.Condition()

    async def hook(self, request: Request) -> Response:
        await request.body()
        release = asyncio.get_running_loop().create_future()
        async with self.changed:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            self.waiting.append(release)
            self.changed.notify_all()
        await release
        async with self.changed:
            self.in_flight -= 1
            self.done += 1
            self.changed.notify_all()
        return Response("ok")

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[Route("/hooks/{name}", self.hook, methods=["POST"])])


async def test_one_delivery_reaches_a_users_webhooks_a_few_at_a_time(
    pool: asyncpg.Pool, pki: Pki, account_id: str
) -> None:
    receiver = Holding()
    box = SecretBox(os.urandom(32))
    async with serve_tls(receiver.app, pki) as port:
        for i in range(10):
            hook_id = uuid.uuid4()
            url = f"https://localhost:{port}/hooks/{i}"
            sealed = box.seal("s", account_id, str(hook_id))
            await hooks_store.insert(pool, account_id, "u1", hook_id, url, "", False, sealed, max_per_user=10)
        policy = ssrf.Policy(allowed_ports=(port,), allowed_networks=ssrf.parse_networks("127.0.0.0/8"))
        client = ssrf.client(ca_file=pki.ca_file)
        sender = WebhookSender(pool=pool, client=client, guard=ssrf.Guard(policy), box=box, fanout=3)
        handled = asyncio.ensure_future(sender.handle(lease_for(message(account_id, "u1"), "other_apps")))
        # One POST released at a time, once as many are in flight as the bound allows. Before the first
        # release the sender gets a moment to post more: one posting to all ten at once shows here
        # (the pause only lets a wrong sender show itself; a right one passes however long it is).
        async with receiver.changed:
            await receiver.changed.wait_for(lambda: receiver.in_flight >= 3)
        await asyncio.sleep(0.5)
        for released in range(1, 11):
            want = min(3, 11 - released)
            async with receiver.changed:
                await receiver.changed.wait_for(lambda: receiver.in_flight >= want)  # noqa: B023 - awaited here
                receiver.waiting.pop(0).set_result(None)
                await receiver.changed.wait_for(lambda: receiver.done == released)  # noqa: B023 - awaited here
        assert isinstance(await handled, Sent)
        await client.aclose()
    assert receiver.most == 3
