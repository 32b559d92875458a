"""Settings of the three senders: every problem named at once, credentials optional only where documented."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from belfry.errors import ConfigError

from services.mobile.settings import load_settings as mobile_settings
from services.webhooks.settings import load_settings as webhooks_settings
from services.webpush.settings import load_settings as webpush_settings
from tests.conftest import common_env


def test_webpush_needs_a_vapid_key_and_a_valid_policy(token_keys: dict[str, bytes]) -> None:
    env = common_env(
        "postgresql://x/y",
        token_keys,
        BELFRY_WEBPUSH_ALLOWED_PORTS="443,https",
        BELFRY_WEBPUSH_ALLOW_NETWORKS="not-a-network",
        BELFRY_VAPID_SUBJECT="ops@example.com",
    )
    with pytest.raises(ConfigError) as err:
        webpush_settings(env)
    for fragment in ("BELFRY_VAPID_PRIVATE_KEY", "ALLOWED_PORTS", "ALLOW_NETWORKS", "BELFRY_VAPID_SUBJECT"):
        assert fragment in err.value.message


def test_webpush_defaults_allow_only_known_push_services_on_443(token_keys: dict[str, bytes], tmp_path: Path) -> None:
    env = common_env("postgresql://x/y", token_keys, BELFRY_VAPID_PRIVATE_KEY_FILE=str(tmp_path / "v.pem"))
    settings = webpush_settings(env)
    assert settings.policy.allowed_ports == (443,)
    assert "fcm.googleapis.com" in settings.policy.allowed_hosts
    assert settings.policy.allowed_networks == ()


def test_webhooks_need_a_secret_key(token_keys: dict[str, bytes]) -> None:
    with pytest.raises(ConfigError) as err:
        webhooks_settings(common_env("postgresql://x/y", token_keys))
    assert "BELFRY_WEBHOOK_SECRET_KEY" in err.value.message


def test_mobile_runs_without_credentials_but_refuses_broken_ones(token_keys: dict[str, bytes], tmp_path: Path) -> None:
    settings = mobile_settings(common_env("postgresql://x/y", token_keys))
    assert settings.fcm is None
    assert settings.apns is None
    broken = tmp_path / "sa.json"
    broken.write_text(json.dumps({"project_id": "p"}))
    key = tmp_path / "AuthKey.p8"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    env = common_env(
        "postgresql://x/y", token_keys, BELFRY_FCM_SERVICE_ACCOUNT_FILE=str(broken), BELFRY_APNS_KEY_FILE=str(key)
    )
    with pytest.raises(ConfigError) as err:
        mobile_settings(env)
    assert "service-account" in err.value.message
    assert "BELFRY_APNS_KEY_ID" in err.value.message
    assert ".p8 EC private key" in err.value.message
