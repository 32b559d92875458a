"""Mobile push: FCM HTTP v1 (OAuth2 service account) and APNs (HTTP/2, ES256) against loopback fakes."""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import httpx
import pytest
from belfry import channels, rpc, service
from belfry.api.mobile.v1 import mobile_pb2 as pb
from belfry.api.mobile.v1 import mobile_pb2_grpc as pb_grpc
from belfry.queue import Drop, Fail, Retry, Sent
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.gateway import store as gateway_store
from services.mobile.apns import TOKEN_REUSE_SECONDS, Apns
from services.mobile.fcm import Fcm
from services.mobile.sender import MobileSender
from services.mobile.server import build_for
from services.mobile.settings import ApnsSettings, FcmSettings, load_settings
from tests.conftest import client_tls, common_env
from tests.push.conftest import enqueue_message, message, token_for
from tests.push.fakes.apns import ApnsPush, FakeApns
from tests.push.fakes.fcm import FakeFcm
from tests.push.fakes.http import serve_tls
from tests.push.fakes.tls import Pki
from tests.push.push_helpers import lease_for, settled

BUNDLE = "com.example.crm"
PACKAGE = "com.example.crm.android"


@dataclass
class Providers:
    """The running fakes and the credentials the service is given."""

    fcm: FakeFcm
    apns: FakeApns
    fcm_settings: FcmSettings
    apns_settings: ApnsSettings
    service_account_file: Path
    apns_key_file: Path


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture(scope="session")
async def providers(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Providers]:
    """FCM (HTTP/1.1 + OAuth2) and APNs (HTTP/2) fakes with freshly minted credentials."""
    folder = tmp_path_factory.mktemp("mobile")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    fcm = FakeFcm(rsa_key.public_key(), "belfry@example-project.iam.gserviceaccount.com", "example-project")
    apns = FakeApns(ec_key.public_key(), key_id="ABC123DEFG", team_id="TEAM123456", bundle_id=BUNDLE)
    apns_server = await apns.serve(pki)
    apns_port = apns_server.sockets[0].getsockname()[1]
    async with serve_tls(fcm.app, pki) as fcm_port:
        fcm.token_uri = f"https://localhost:{fcm_port}/token"
        account = {
            "type": "service_account",
            "project_id": fcm.project_id,
            "private_key_id": secrets.token_hex(20),
            "private_key": _pem(rsa_key),
            "client_email": fcm.client_email,
            "token_uri": fcm.token_uri,
        }
        sa_file = folder / "service-account.json"
        sa_file.write_text(json.dumps(account))
        key_file = folder / "AuthKey_ABC123DEFG.p8"
        key_file.write_text(_pem(ec_key))
        yield Providers(
            fcm,
            apns,
            FcmSettings(
                fcm.project_id, fcm.client_email, _pem(rsa_key), fcm.token_uri, f"https://localhost:{fcm_port}"
            ),
            ApnsSettings(_pem(ec_key), "ABC123DEFG", "TEAM123456", f"https://localhost:{apns_port}"),
            sa_file,
            key_file,
        )
    apns_server.close()


@pytest.fixture(scope="session")
async def mobile(
    database_url: str, token_keys: dict[str, bytes], pki: Pki, providers: Providers
) -> AsyncIterator[service.Running]:
    """The mobile service pointed at the fakes."""
    env = common_env(
        database_url,
        token_keys,
        identity="mobile",
        BELFRY_FCM_SERVICE_ACCOUNT_FILE=str(providers.service_account_file),
        BELFRY_FCM_ENDPOINT=providers.fcm_settings.endpoint,
        BELFRY_APNS_KEY_FILE=str(providers.apns_key_file),
        BELFRY_APNS_KEY_ID="ABC123DEFG",
        BELFRY_APNS_TEAM_ID="TEAM123456",
        BELFRY_APNS_ENDPOINT=providers.apns_settings.endpoint,
        BELFRY_MOBILE_CA_FILE=str(pki.ca_file),
    )
    settings = load_settings(env)
    running = await service.start("mobile", settings.common, build_for(settings))
    yield running
    await running.stop(0.1)


@pytest.fixture
async def stub(mobile: service.Running) -> AsyncIterator[pb_grpc.MobileStub]:
    """A client of the Mobile API."""
    async with rpc.connect(f"127.0.0.1:{mobile.port}", client_tls()) as ch:
        yield pb_grpc.MobileStub(ch)


def ios_token() -> str:
    """An APNs device token: 32 random bytes in hex."""
    return secrets.token_hex(32)


def fcm_token() -> str:
    """An FCM registration token's shape."""
    return secrets.token_urlsafe(20) + ":APA91b" + secrets.token_urlsafe(100)


async def register(
    stub: pb_grpc.MobileStub, meta: list[tuple[str, str]], platform: pb.Platform.ValueType, token: str
) -> pb.Device:
    """What the app does at sign-in."""
    app_id = BUNDLE if platform == pb.PLATFORM_IOS else PACKAGE
    reply = await stub.RegisterDevice(
        pb.RegisterDeviceRequest(platform=platform, token=token, app_id=app_id, label="phone"), metadata=meta
    )
    device: pb.Device = reply.device
    return device


async def test_both_platforms_end_to_end(
    stub: pb_grpc.MobileStub, providers: Providers, pool: asyncpg.Pool, token_keys: dict[str, bytes], account_id: str
) -> None:
    meta = token_for(token_keys, account_id, "u1")
    apple, android = ios_token(), fcm_token()
    await register(stub, meta, pb.PLATFORM_IOS, apple)
    await register(stub, meta, pb.PLATFORM_ANDROID, android)
    msg = message(account_id, "u1")
    await enqueue_message(pool, "mobile", msg)
    row = await settled(pool, msg, "mobile")
    assert row["state"] == "sent", row["errors"]
    ios = [p for p in providers.apns.received if p.token == apple]
    assert len(ios) == 1
    assert ios[0].payload["aps"]["alert"] == {"title": msg.title, "body": msg.body}
    assert ios[0].payload["notification_id"] == msg.notification_id
    assert ios[0].headers["apns-topic"] == BUNDLE
    assert ios[0].headers["apns-push-type"] == "alert"
    assert ios[0].headers["apns-collapse-id"]
    assert providers.apns.alpn[-1] == "h2"
    fcm = [m for m in providers.fcm.received if m["token"] == android]
    assert len(fcm) == 1
    assert fcm[0]["notification"] == {"title": msg.title, "body": msg.body}
    assert fcm[0]["android"]["notification"]["tag"] == msg.notification_id


def _client(pki: Pki, *, http2: bool) -> httpx.AsyncClient:
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=str(pki.ca_file))
    return httpx.AsyncClient(http2=http2, verify=context, trust_env=False)


@pytest.fixture
async def direct(pool: asyncpg.Pool, pki: Pki, providers: Providers) -> AsyncIterator[tuple[MobileSender, Fcm, Apns]]:
    """The service's sender with its providers, outside the loop (for the error matrix)."""
    clients = [_client(pki, http2=False), _client(pki, http2=True)]
    fcm = Fcm(providers.fcm_settings, clients[0])
    apns = Apns(providers.apns_settings, clients[1])
    yield MobileSender(pool=pool, android=fcm, ios=apns), fcm, apns
    for client in clients:
        await client.aclose()


INVALID_TOKEN = "The registration token is not a valid FCM registration token"
# platform, scripted answers, outcome type, retry_after, device kept?
MATRIX = [
    ("android", [], Sent, None, True),
    ("android", [(404, "UNREGISTERED", "Requested entity was not found.", {})], Fail, None, False),
    ("android", [(400, "INVALID_ARGUMENT", INVALID_TOKEN, {})], Fail, None, False),
    ("android", [(400, "INVALID_ARGUMENT", "Invalid value at 'message.data'", {})], Fail, None, True),
    ("android", [(403, "SENDER_ID_MISMATCH", "SenderId mismatch", {})], Fail, None, False),
    ("android", [(429, "QUOTA_EXCEEDED", "Quota exceeded.", {"retry-after": "60"})], Retry, 60.0, True),
    (
        "android",
        [(503, "UNAVAILABLE", "The service is currently unavailable.", {"retry-after": "12"})],
        Retry,
        12.0,
        True,
    ),
    ("android", [(500, "INTERNAL", "Internal error encountered.", {})], Retry, None, True),
    ("ios", [], Sent, None, True),
    ("ios", [(410, "Unregistered")], Fail, None, False),
    ("ios", [(400, "BadDeviceToken")], Fail, None, False),
    ("ios", [(400, "DeviceTokenNotForTopic")], Fail, None, False),
    ("ios", [(403, "ExpiredProviderToken")], Sent, None, True),  # renewed once, then accepted
    ("ios", [(403, "ExpiredProviderToken"), (403, "ExpiredProviderToken")], Retry, None, True),
    ("ios", [(429, "TooManyRequests")], Retry, None, True),
    ("ios", [(500, "InternalServerError")], Retry, None, True),
    ("ios", [(503, "ServiceUnavailable")], Retry, None, True),
    ("ios", [(413, "PayloadTooLarge")], Fail, None, True),
]


@pytest.mark.parametrize(("platform", "answers", "kind", "retry_after", "kept"), MATRIX)
async def test_error_matrix(
    direct: tuple[MobileSender, Fcm, Apns],
    stub: pb_grpc.MobileStub,
    providers: Providers,
    token_keys: dict[str, bytes],
    account_id: str,
    platform: str,
    answers: list[tuple],  # type: ignore[type-arg]  # rows differ per provider
    kind: type,
    retry_after: float | None,
    kept: bool,
) -> None:
    meta = token_for(token_keys, account_id, "u1")
    token = ios_token() if platform == "ios" else fcm_token()
    await register(stub, meta, pb.PLATFORM_IOS if platform == "ios" else pb.PLATFORM_ANDROID, token)
    scripts = providers.apns.scripted if platform == "ios" else providers.fcm.scripted
    scripts[token] = list(answers)
    jwts_before = len(providers.apns.jwts)
    outcome = await direct[0].handle(lease_for(message(account_id, "u1"), "mobile"))
    assert isinstance(outcome, kind), outcome
    if isinstance(outcome, Retry):
        assert outcome.retry_after == retry_after
    devices = (await stub.ListDevices(pb.ListDevicesRequest(), metadata=meta)).devices
    assert (len(devices) == 1) is kept
    if answers and answers[0][1] == "ExpiredProviderToken":
        used = providers.apns.jwts[jwts_before:]
        assert len(used) == 2
        assert used[0] != used[1]  # a renewed provider token, not the refused one again


async def test_the_fcm_access_token_and_apns_provider_token_are_reused(
    pool: asyncpg.Pool,
    pki: Pki,
    providers: Providers,
    stub: pb_grpc.MobileStub,
    token_keys: dict[str, bytes],
    account_id: str,
) -> None:
    now = [1_000_000.0]
    clients = [_client(pki, http2=False), _client(pki, http2=True)]
    fcm = Fcm(providers.fcm_settings, clients[0])
    apns = Apns(providers.apns_settings, clients[1], clock=lambda: now[0])
    sender = MobileSender(pool=pool, android=fcm, ios=apns)
    meta = token_for(token_keys, account_id, "u1")
    await register(stub, meta, pb.PLATFORM_ANDROID, fcm_token())
    for _ in range(3):
        assert isinstance(await sender.handle(lease_for(message(account_id, "u1"), "mobile")), Sent)
    assert fcm.exchanges == 1
    first = apns._provider_token()
    now[0] += TOKEN_REUSE_SECONDS - 1
    assert apns._provider_token() == first
    now[0] += 2
    assert apns._provider_token() != first
    for client in clients:
        await client.aclose()


async def test_without_credentials_deliveries_fail_as_not_configured(
    pool: asyncpg.Pool, stub: pb_grpc.MobileStub, token_keys: dict[str, bytes], account_id: str
) -> None:
    sender = MobileSender(pool=pool, android=None, ios=None)
    meta = token_for(token_keys, account_id, "u1")
    await register(stub, meta, pb.PLATFORM_IOS, ios_token())
    await register(stub, meta, pb.PLATFORM_ANDROID, fcm_token())
    assert await sender.handle(lease_for(message(account_id, "u1"), "mobile")) == Fail("not configured")
    assert await sender.handle(lease_for(message(account_id, "nobody"), "mobile")) == Drop("no mobile device")


async def test_registration_is_validated_and_scoped(
    stub: pb_grpc.MobileStub, token_keys: dict[str, bytes], account_id: str
) -> None:
    meta = token_for(token_keys, account_id, "u1")
    bad = [
        (pb.RegisterDeviceRequest(platform=pb.PLATFORM_UNSPECIFIED, token=ios_token(), app_id=BUNDLE), "platform"),
        (pb.RegisterDeviceRequest(platform=pb.PLATFORM_IOS, token="not-hex", app_id=BUNDLE), "token"),
        (pb.RegisterDeviceRequest(platform=pb.PLATFORM_ANDROID, token="x y", app_id=PACKAGE), "token"),
        (pb.RegisterDeviceRequest(platform=pb.PLATFORM_IOS, token=ios_token(), app_id=""), "app_id"),
    ]
    for request, fragment in bad:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RegisterDevice(request, metadata=meta)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in (err.value.details() or "")
    assert not (await stub.ListDevices(pb.ListDevicesRequest(), metadata=meta)).devices
    token = ios_token()
    first = await register(stub, meta, pb.PLATFORM_IOS, token)
    assert (await register(stub, meta, pb.PLATFORM_IOS, token)).device_id == first.device_id
    other = token_for(token_keys, account_id, "u2")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeleteDevice(pb.DeleteDeviceRequest(device_id=first.device_id), metadata=other)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeleteDevice(pb.DeleteDeviceRequest(device_id=str(uuid.uuid4())))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await stub.DeleteDevice(pb.DeleteDeviceRequest(device_id=first.device_id), metadata=meta)
    assert not (await stub.ListDevices(pb.ListDevicesRequest(), metadata=meta)).devices


async def test_pushes_carry_the_bell_count_as_the_badge_and_a_read_elsewhere_updates_it_once_per_window(
    stub: pb_grpc.MobileStub, providers: Providers, pool: asyncpg.Pool, token_keys: dict[str, bytes], account_id: str
) -> None:
    meta = token_for(token_keys, account_id, "u1")
    apple, android = ios_token(), fcm_token()
    await register(stub, meta, pb.PLATFORM_IOS, apple)
    await register(stub, meta, pb.PLATFORM_ANDROID, android)
    # Two unread items behind the bell, stored by the gateway's own code.
    unread = [message(account_id, "u1"), message(account_id, "u1")]
    await gateway_store.add_many(pool, unread)
    msg = message(account_id, "u1")
    await enqueue_message(pool, "mobile", msg)
    assert (await settled(pool, msg, "mobile"))["state"] == "sent"
    [ios] = [p for p in providers.apns.received if p.token == apple]
    [fcm] = [m for m in providers.fcm.received if m["token"] == android]
    assert ios.payload["aps"]["badge"] == 2 and ios.payload["aps"]["alert"]["title"] == msg.title
    assert fcm["android"]["notification"]["notification_count"] == 2 and fcm["data"]["badge"] == "2"

    # The user reads one item in the bell, then reads and unreads others: the phones hear of it once per
    # window, at its end, with the count of that moment.
    await gateway_store.mark_notification_read(pool, account_id, "u1", unread[0].notification_id)
    for _ in range(5):
        await gateway_store.read_state_changed(pool, account_id, "u1")
    queued = await pool.fetchval(
        "select count(*) from queue.deliveries where account_id = $1 and channel = 'mobile' and topic = $2",
        account_id,
        channels.MOBILE_BADGE_TOPIC,
    )
    assert 1 <= queued <= 2  # five changes, one update per window (two if a window ended meanwhile)

    def badge_only(p: object) -> bool:
        return isinstance(p, ApnsPush) and p.token == apple and "alert" not in p.payload["aps"]

    for _ in range(1500):  # the update is released at the end of its window (10 s at most)
        if any(badge_only(p) for p in providers.apns.received):
            break
        await asyncio.sleep(0.02)
    [update] = [p for p in providers.apns.received if badge_only(p)][:1]
    assert update.payload == {"aps": {"badge": 1}} and update.headers["apns-priority"] == "5"
    data_only = [m for m in providers.fcm.received if m["token"] == android and "notification" not in m]
    assert data_only and data_only[0]["data"] == {"badge": "1"}
