"""Web push end to end: the loopback push service decrypts each push and verifies its VAPID JWT."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from urllib.parse import unquote

import asyncpg
import grpc
import pytest
from belfry import service, ssrf
from belfry.api.webpush.v1 import webpush_pb2 as pb
from belfry.api.webpush.v1 import webpush_pb2_grpc as pb_grpc
from belfry.message import Item
from belfry.openlink import OpenSigner
from belfry.queue import Drop, Fail, Retry, Sent
from belfry.queue.presence import touch_many
from belfry.unsubscribe import Links
from cryptography.hazmat.primitives.asymmetric import ec

from services.webpush import payload
from services.webpush.sender import WebPushSender
from services.webpush.vapid import Vapid, load_or_create
from tests.push.conftest import OPEN_KEY, enqueue_message, message, push_port, token_for
from tests.push.fakes.push_service import BrowserSubscription, PushService
from tests.push.fakes.tls import Pki
from tests.push.push_helpers import lease_for, settled
from tests.push.webpush_sender import open_sender


async def register(
    channel: grpc.aio.Channel, token_keys: dict[str, bytes], account_id: str, user_id: str, sub: BrowserSubscription
) -> pb.Subscription:
    """What the web app does after pushManager.subscribe()."""
    stub = pb_grpc.WebPushStub(channel)
    reply = await stub.RegisterSubscription(
        pb.RegisterSubscriptionRequest(endpoint=sub.endpoint, p256dh=sub.p256dh, auth=_b64(sub.auth), label="laptop"),
        metadata=token_for(token_keys, account_id, user_id),
    )
    subscription: pb.Subscription = reply.subscription
    return subscription


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_a_push_is_decrypted_and_its_vapid_jwt_verified_by_the_push_service(
    webpush: service.Running,
    channel: grpc.aio.Channel,
    push_service: PushService,
    pool: asyncpg.Pool,
    token_keys: dict[str, bytes],
    account_id: str,
) -> None:
    sub = push_service.subscribe()
    await register(channel, token_keys, account_id, "u1", sub)
    key = await pb_grpc.WebPushStub(channel).GetVapidPublicKey(pb.GetVapidPublicKeyRequest())
    msg = message(account_id, "u1")
    await enqueue_message(pool, "browser", msg)
    row = await settled(pool, msg, "browser")
    assert row["state"] == "sent", row["errors"]
    got = [r for r in push_service.received if r.sub_id == sub.sub_id]
    assert len(got) == 1
    assert got[0].payload["title"] == "Contact assigned"
    assert got[0].payload["body"] == msg.body  # text stays text; the service worker never renders markup
    assert got[0].payload["tag"] == msg.notification_id
    # Opening it goes through the gateway's signed /open link (on the app's origin: relative), which marks the
    # notification read and then redirects to the message's URL.
    opened = got[0].payload["url"]
    assert opened.startswith("/open?t=")
    link = OpenSigner(Links(OPEN_KEY.encode(), ttl_seconds=3600)).verify(unquote(opened.removeprefix("/open?t=")))
    assert (link.account_id, link.user_id, link.notification_id, link.target) == (
        account_id,
        "u1",
        msg.notification_id,
        msg.url,
    )
    assert got[0].headers["authorization"].endswith(f"k={key.public_key}")
    assert got[0].jwt_claims["aud"] == push_service.origin
    assert got[0].jwt_claims["sub"] == "mailto:ops@example.com"
    assert 0 < int(got[0].headers["ttl"]) <= 3600
    listed = await pb_grpc.WebPushStub(channel).ListSubscriptions(
        pb.ListSubscriptionsRequest(), metadata=token_for(token_keys, account_id, "u1")
    )
    assert listed.subscriptions[0].HasField("last_success_at")


async def test_a_user_with_a_live_tab_gets_no_web_push(
    webpush: service.Running,
    channel: grpc.aio.Channel,
    push_service: PushService,
    pool: asyncpg.Pool,
    token_keys: dict[str, bytes],
    account_id: str,
) -> None:
    sub = push_service.subscribe()
    await register(channel, token_keys, account_id, "u1", sub)
    await touch_many(pool, [(account_id, "u1")], "tab-1", "gw-1", 60)
    msg = message(account_id, "u1")
    await enqueue_message(pool, "browser", msg)
    row = await settled(pool, msg, "browser")
    assert row["state"] == "dropped"
    assert not [r for r in push_service.received if r.sub_id == sub.sub_id]


@pytest.fixture
async def sender(pool: asyncpg.Pool, pki: Pki, push_service: PushService) -> AsyncIterator[WebPushSender]:
    """A sender outside the service, for the error matrix (same code the service runs)."""
    policy = ssrf.Policy(
        allowed_hosts=("localhost",),
        allowed_ports=(push_port(push_service),),
        allowed_networks=ssrf.parse_networks("127.0.0.0/8"),
    )
    async with open_sender(pool, pki, ssrf.Guard(policy), default_ttl=86400) as (built, _):
        yield built


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# (status, headers) → (outcome type, retry_after, subscription kept?, reason fragment)
MATRIX = [
    (201, {}, Sent, None, True, ""),
    (202, {}, Sent, None, True, ""),
    (404, {}, Fail, None, False, "(404)"),
    (410, {}, Fail, None, False, "(410)"),
    (429, {"retry-after": "120"}, Retry, 120.0, True, "(429)"),
    (503, {"retry-after": "30"}, Retry, 30.0, True, "(503)"),
    (413, {}, Fail, None, True, "too large"),
    (401, {}, Fail, None, True, "VAPID"),
    (403, {}, Fail, None, True, "VAPID"),
    (500, {}, Retry, None, True, "(500)"),
    (307, {"location": "https://127.0.0.1:1/internal"}, Fail, None, True, "redirect"),
]


@pytest.mark.parametrize(("status", "headers", "kind", "retry_after", "kept", "reason"), MATRIX)
async def test_push_service_answers(
    sender: WebPushSender,
    push_service: PushService,
    channel: grpc.aio.Channel,
    token_keys: dict[str, bytes],
    account_id: str,
    status: int,
    headers: dict[str, str],
    kind: type,
    retry_after: float | None,
    kept: bool,
    reason: str,
) -> None:
    sub = push_service.subscribe()
    await register(channel, token_keys, account_id, "u1", sub)
    if status not in (201,):
        push_service.script(sub.sub_id, (status, headers))
    before = push_service.requests
    outcome = await sender.handle(lease_for(message(account_id, "u1"), "browser"))
    assert isinstance(outcome, kind)
    if isinstance(outcome, Retry):
        assert outcome.retry_after == retry_after
    if isinstance(outcome, Fail | Retry):
        assert reason in outcome.error
    assert push_service.requests == before + 1  # one request: a redirect is never followed
    listed = await pb_grpc.WebPushStub(channel).ListSubscriptions(
        pb.ListSubscriptionsRequest(), metadata=token_for(token_keys, account_id, "u1")
    )
    assert (len(listed.subscriptions) == 1) is kept


async def test_no_subscription_is_recorded_as_dropped(sender: WebPushSender, account_id: str) -> None:
    outcome = await sender.handle(lease_for(message(account_id, "nobody"), "browser"))
    assert outcome == Drop("no push subscription")


async def test_long_bodies_are_truncated_to_fit_and_still_decrypt(
    sender: WebPushSender,
    push_service: PushService,
    channel: grpc.aio.Channel,
    token_keys: dict[str, bytes],
    account_id: str,
) -> None:
    sub = push_service.subscribe()
    await register(channel, token_keys, account_id, "u1", sub)
    body = 'é"<>' * 3000  # multi-byte and escaped characters: the cut must stay valid UTF-8 and JSON
    msg = message(account_id, "u1", body=body)
    assert isinstance(await sender.handle(lease_for(msg, "browser")), Sent)
    got = next(r for r in push_service.received if r.sub_id == sub.sub_id)
    assert got.payload["body"].endswith("…")
    assert body.startswith(got.payload["body"][:-1])
    assert len(payload.encode(msg)) <= payload.MAX_PLAINTEXT


async def test_only_a_notifications_own_retries_share_a_topic(
    sender: WebPushSender,
    push_service: PushService,
    channel: grpc.aio.Channel,
    token_keys: dict[str, bytes],
    account_id: str,
) -> None:
    # A push service keeps only the newest pending push of a Topic (RFC 8030 §5.4): distinct
    # notifications of one topic, merged or not, must never replace each other for an offline browser.
    sub = push_service.subscribe()
    await register(channel, token_keys, account_id, "u1", sub)
    one = (Item("contact", "1", "A", "/c/1"),)  # the dispatcher gives every object notification its item
    three = (*one, Item("contact", "2", "B", "/c/2"), Item("contact", "3", "C", "/c/3"))
    sent = [
        message(account_id, "u1", items=one),
        message(account_id, "u1", items=(Item("contact", "2", "B", "/c/2"),)),
        message(account_id, "u1", items=three[:2], title="2 contacts were assigned to you"),
        message(account_id, "u1", items=three, title="3 contacts were assigned to you"),
    ]
    for msg in sent:
        assert isinstance(await sender.handle(lease_for(msg, "browser")), Sent)
    retry = replace(lease_for(sent[0], "browser"), attempts=2, token=2)  # the same delivery, claimed again
    assert isinstance(await sender.handle(retry), Sent)
    got = [r for r in push_service.received if r.sub_id == sub.sub_id]
    assert [r.payload["tag"] for r in got] == [m.notification_id for m in (*sent, sent[0])]
    topics = [r.headers["topic"] for r in got]
    assert len(set(topics[:4])) == 4
    assert topics[4] == topics[0]
    assert all(len(t) <= 32 for t in topics)


async def test_the_vapid_header_is_signed_once_and_renewed_before_expiry() -> None:
    now = [1_000_000.0]
    vapid = Vapid(_key(), "mailto:ops@example.com", clock=lambda: now[0])
    first = vapid.header("https://push.example.com")
    now[0] += 10 * 3600
    assert vapid.header("https://push.example.com") == first
    assert vapid.header("https://other.example.com") != first
    now[0] += 2 * 3600
    assert vapid.header("https://push.example.com") != first


async def test_the_vapid_key_file_is_created_once_and_reused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "keys" / "vapid.pem"
    first = load_or_create("", path)
    assert path.stat().st_mode & 0o777 == 0o600
    second = load_or_create("", path)
    assert first.private_numbers() == second.private_numbers()


async def test_registration_is_validated_and_scoped_to_the_caller(
    webpush: service.Running,
    channel: grpc.aio.Channel,
    push_service: PushService,
    token_keys: dict[str, bytes],
    account_id: str,
) -> None:
    stub = pb_grpc.WebPushStub(channel)
    sub = push_service.subscribe()
    good = pb.RegisterSubscriptionRequest(endpoint=sub.endpoint, p256dh=sub.p256dh, auth=_b64(sub.auth))
    meta = token_for(token_keys, account_id, "u1")
    bad = [
        (pb.RegisterSubscriptionRequest(endpoint="", p256dh=sub.p256dh, auth=_b64(sub.auth)), "endpoint"),
        (
            pb.RegisterSubscriptionRequest(
                endpoint=sub.endpoint.replace("https", "http"), p256dh=sub.p256dh, auth=_b64(sub.auth)
            ),
            "https",
        ),
        (
            pb.RegisterSubscriptionRequest(
                endpoint=f"https://evil.example.com:{push_port(push_service)}/x", p256dh=sub.p256dh, auth=_b64(sub.auth)
            ),
            "push service",
        ),
        (pb.RegisterSubscriptionRequest(endpoint=sub.endpoint, p256dh=_b64(b"x" * 65), auth=_b64(sub.auth)), "p256dh"),
        (pb.RegisterSubscriptionRequest(endpoint=sub.endpoint, p256dh=sub.p256dh, auth=_b64(b"short")), "auth"),
    ]
    for request, fragment in bad:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RegisterSubscription(request, metadata=meta)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in (err.value.details() or "")
    listed = await stub.ListSubscriptions(pb.ListSubscriptionsRequest(), metadata=meta)
    assert not listed.subscriptions  # a refused request wrote nothing
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RegisterSubscription(good)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    first = (await stub.RegisterSubscription(good, metadata=meta)).subscription
    again = (await stub.RegisterSubscription(good, metadata=meta)).subscription
    assert first.subscription_id == again.subscription_id
    other = token_for(token_keys, account_id, "u2")
    assert not (await stub.ListSubscriptions(pb.ListSubscriptionsRequest(), metadata=other)).subscriptions
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeleteSubscription(
            pb.DeleteSubscriptionRequest(subscription_id=first.subscription_id), metadata=other
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await stub.DeleteSubscription(pb.DeleteSubscriptionRequest(subscription_id=first.subscription_id), metadata=meta)
    assert not (await stub.ListSubscriptions(pb.ListSubscriptionsRequest(), metadata=meta)).subscriptions
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeleteSubscription(pb.DeleteSubscriptionRequest(subscription_id="nope"), metadata=meta)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_message_that_cannot_fit_fails_instead_of_retrying(
    sender: WebPushSender,
    push_service: PushService,
    channel: grpc.aio.Channel,
    token_keys: dict[str, bytes],
    account_id: str,
) -> None:
    sub = push_service.subscribe()
    await register(channel, token_keys, account_id, "u1", sub)
    before = push_service.requests
    outcome = await sender.handle(lease_for(message(account_id, "u1", title="T" * 5000), "browser"))
    assert isinstance(outcome, Fail)
    assert "does not fit" in outcome.error
    assert push_service.requests == before
