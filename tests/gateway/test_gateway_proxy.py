"""The JSON proxies to the real preferences and webpush services: token passed through, statuses mapped."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from belfry import service
from belfry.auth import TokenIssuer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.webpush.server import build_for as webpush_build_for
from services.webpush.settings import load_settings as webpush_settings
from tests.conftest import common_env
from tests.gateway import browser as b
from tests.gateway.conftest import Replica, StartReplica


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="session")
async def webpush(
    database_url: str, token_keys: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[service.Running]:
    """The real webpush service (its VAPID key is created on first start)."""
    key_file: Path = tmp_path_factory.mktemp("gateway-vapid") / "vapid.pem"
    settings = webpush_settings(
        common_env(
            database_url,
            token_keys,
            BELFRY_VAPID_PRIVATE_KEY_FILE=str(key_file),
            # Offline: "localhost" stands in for a push service; other private addresses stay refused.
            BELFRY_WEBPUSH_ALLOWED_HOSTS="localhost",
            BELFRY_WEBPUSH_ALLOW_NETWORKS="127.0.0.0/8",
        )
    )
    running = await service.start("webpush", settings.common, webpush_build_for(settings))
    yield running
    await running.stop(0.2)


@pytest.fixture(scope="session")
async def prefs_service(database_url: str, token_keys: dict[str, bytes]) -> AsyncIterator[service.Running]:
    """The real preferences service."""
    running = await b.start_preferences(database_url, token_keys)
    yield running
    await running.stop(0.2)


@pytest.fixture
async def proxied(
    start_replica: StartReplica, webpush: service.Running, prefs_service: service.Running, account_id: str
) -> Replica:
    """A gateway wired to both services, the test user in the directory."""
    await b.seed_user(prefs_service.port, account_id, "u1")
    return await start_replica(
        BELFRY_WEBPUSH_ADDRESS=f"127.0.0.1:{webpush.port}", BELFRY_PREFERENCES_ADDRESS=f"127.0.0.1:{prefs_service.port}"
    )


async def test_web_push_opt_in_through_the_gateway(proxied: Replica, issuer: TokenIssuer, account_id: str) -> None:
    headers = {"authorization": f"Bearer {issuer.issue(account_id, 'u1')}"}
    async with httpx.AsyncClient(base_url=proxied.http, headers=headers) as http:
        key = (await http.post("/api/webpush/GetVapidPublicKey", json={})).json()["public_key"]
        raw = base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))
        assert len(raw) == 65  # an uncompressed P-256 point, as PushManager.subscribe wants it
        assert raw[0] == 4
        browser_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        p256dh = _b64(
            browser_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        )
        subscription = {
            "endpoint": "https://localhost/push/abc123",
            "p256dh": p256dh,
            "auth": _b64(os.urandom(16)),
        }
        registered = await http.post("/api/webpush/RegisterSubscription", json=subscription)
        assert registered.status_code == 200, registered.text
        listed = (await http.post("/api/webpush/ListSubscriptions", json={})).json()
        assert [s["endpoint"] for s in listed["subscriptions"]] == [subscription["endpoint"]]
        private = await http.post(
            "/api/webpush/RegisterSubscription", json={**subscription, "endpoint": "https://evil.example/x"}
        )
        assert private.status_code == 400
        assert private.json()["error"]
        assert (await http.post("/api/webpush/ListSubscriptions", json={})).json()["subscriptions"] == listed[
            "subscriptions"
        ]


async def test_proxy_maps_errors_and_checks_input(proxied: Replica, issuer: TokenIssuer, account_id: str) -> None:
    headers = {"authorization": f"Bearer {issuer.issue(account_id, 'u1')}"}
    async with httpx.AsyncClient(base_url=proxied.http) as http:
        assert (await http.post("/api/preferences/GetPreferences", json={})).status_code == 401
        unknown = await http.post("/api/preferences/EffectiveBatch", json={}, headers=headers)
        assert unknown.status_code == 400  # internal RPCs are not reachable from the web
        assert "EffectiveBatch" in unknown.json()["error"]
        wrong_shape = await http.post("/api/preferences/SetMuted", json={"muted": "loud"}, headers=headers)
        assert wrong_shape.status_code == 400
        bad_sound = await http.post(
            "/api/preferences/SetTopicSound",
            json={"topic": "academy.reward_updated", "sound": "kazoo"},
            headers=headers,
        )
        assert bad_sound.status_code == 400
        assert bad_sound.json()["code"] == "INVALID_ARGUMENT"
        ok = await http.post("/api/preferences/SetMuted", json={"muted": True}, headers=headers)
        assert ok.status_code == 200
        assert (await http.post("/api/preferences/GetPreferences", json={}, headers=headers)).json()["settings"][
            "muted"
        ] is True


async def test_the_vapid_public_key_needs_no_token(proxied: Replica, issuer: TokenIssuer, account_id: str) -> None:
    async with httpx.AsyncClient(base_url=proxied.http) as http:
        anonymous = await http.post("/api/webpush/GetVapidPublicKey", json={})
        assert anonymous.status_code == 200, anonymous.text
        signed_in = await http.post(
            "/api/webpush/GetVapidPublicKey",
            json={},
            headers={"authorization": f"Bearer {issuer.issue(account_id, 'u1')}"},
        )
        assert anonymous.json()["public_key"] == signed_in.json()["public_key"]
        # Only that RPC is public: the caller's subscriptions still need the token.
        assert (await http.post("/api/webpush/ListSubscriptions", json={})).status_code == 401
        foreign = await http.post("/api/webpush/GetVapidPublicKey", json={}, headers={"origin": "https://evil.example"})
        assert foreign.status_code == 403  # a foreign page's POST is refused as for every other route
