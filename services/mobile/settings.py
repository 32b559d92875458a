"""Settings of the mobile sender, read once from the environment.

FCM and APNs are each optional: an unconfigured provider makes its
deliveries fail with the reason "not configured" (never a silent drop).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from belfry.config import CommonSettings, Env, load_common
from belfry.queue.sender import SenderSettings, load_sender_settings
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.mobile import store


@dataclass(frozen=True)
class FcmSettings:
    """A Google service account allowed to send with FCM HTTP v1."""

    project_id: str
    client_email: str
    private_key: str  # PEM (RSA)
    token_uri: str
    endpoint: str  # https://fcm.googleapis.com


@dataclass(frozen=True)
class ApnsSettings:
    """An APNs token-based (.p8) signing key."""

    key_pem: str
    key_id: str
    team_id: str
    endpoint: str  # https://api.push.apple.com or https://api.sandbox.push.apple.com


@dataclass(frozen=True)
class Settings:
    """Everything ``python -m services.mobile`` needs."""

    common: CommonSettings
    fcm: FcmSettings | None
    apns: ApnsSettings | None
    ca_file: Path | None
    sender: SenderSettings
    timeout_seconds: float
    max_devices_per_user: int


def _fcm(env: Env) -> FcmSettings | None:
    path = env.path("BELFRY_FCM_SERVICE_ACCOUNT_FILE")
    if path is None or not path.is_file():
        return None
    try:
        account = json.loads(path.read_text())
        if not isinstance(
            serialization.load_pem_private_key(account["private_key"].encode(), password=None), rsa.RSAPrivateKey
        ):
            raise ValueError("private_key (not an RSA key)")
        return FcmSettings(
            project_id=account["project_id"],
            client_email=account["client_email"],
            private_key=account["private_key"],
            token_uri=account.get("token_uri", "https://oauth2.googleapis.com/token"),
            endpoint=env.https_url("BELFRY_FCM_ENDPOINT", "https://fcm.googleapis.com"),
        )
    except (ValueError, KeyError, TypeError) as exc:
        env.problem(f"BELFRY_FCM_SERVICE_ACCOUNT_FILE ({path}) is not a service-account JSON key: bad or missing {exc}")
        return None


def _apns(env: Env) -> ApnsSettings | None:
    path = env.path("BELFRY_APNS_KEY_FILE")
    if path is None or not path.is_file():
        return None
    key_id, team_id = env.str("BELFRY_APNS_KEY_ID", ""), env.str("BELFRY_APNS_TEAM_ID", "")
    if not key_id or not team_id:
        env.problem("BELFRY_APNS_KEY_FILE needs BELFRY_APNS_KEY_ID and BELFRY_APNS_TEAM_ID (from the Apple portal)")
    key_pem = path.read_text()
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("not an EC key")
    except (ValueError, TypeError):
        env.problem(f"BELFRY_APNS_KEY_FILE ({path}) must hold the .p8 EC private key downloaded from Apple")
    return ApnsSettings(
        key_pem=key_pem,
        key_id=key_id,
        team_id=team_id,
        endpoint=env.https_url("BELFRY_APNS_ENDPOINT", "https://api.push.apple.com"),
    )


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Parse and check the environment; every problem is reported at once."""
    env = Env(environ)
    common = load_common("mobile", env)
    settings = Settings(
        common=common,
        fcm=_fcm(env),
        apns=_apns(env),
        ca_file=env.path("BELFRY_MOBILE_CA_FILE"),
        sender=load_sender_settings(env, common, "mobile", batch=200, concurrency=100, lease_seconds=60.0),
        timeout_seconds=env.float("BELFRY_MOBILE_TIMEOUT_SECONDS", 10.0, minimum=0.1),
        max_devices_per_user=env.int("BELFRY_MOBILE_MAX_DEVICES_PER_USER", store.DEFAULT_MAX_PER_USER, minimum=1),
    )
    env.check()
    return settings
