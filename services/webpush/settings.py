"""Settings of the web push sender, read once from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from belfry import openlink, ssrf
from belfry.config import CommonSettings, Env, load_common
from belfry.openlink import OpenSigner
from belfry.queue.sender import SenderSettings, load_sender_settings
from cryptography.hazmat.primitives import serialization

from services.webpush import store, vapid


@dataclass(frozen=True)
class Settings:
    """Everything ``python -m services.webpush`` needs."""

    common: CommonSettings
    policy: ssrf.Policy
    ca_file: Path | None  # extra CA for the push services (tests, private relays)
    vapid_private_key: str  # PEM, or empty with vapid_key_file set
    vapid_key_file: Path | None  # generated on first run when missing (local defaults)
    vapid_subject: str  # mailto: or https: contact the push services may use
    vapid_other_keys: tuple[str, ...]  # PEM: keys still bound to subscriptions (or next), during a rotation
    default_ttl_seconds: int
    sender: SenderSettings
    timeout_seconds: float
    max_connections: int  # the one session's connection limit, across all push services
    max_subscriptions_per_user: int
    opener: OpenSigner | None = None  # signs each push's "open it" link (BELFRY_UNSUBSCRIBE_KEY); None: plain links


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Parse and check the environment; every problem is reported at once."""
    env = Env(environ)
    common = load_common("webpush", env)
    hosts = env.str("BELFRY_WEBPUSH_ALLOWED_HOSTS", ",".join(ssrf.KNOWN_PUSH_HOSTS))
    ports_raw = env.str("BELFRY_WEBPUSH_ALLOWED_PORTS", "443")
    ports: tuple[int, ...] = (443,)
    try:
        ports = tuple(int(p) for p in ports_raw.split(",") if p.strip())
    except ValueError:
        env.problem(f"BELFRY_WEBPUSH_ALLOWED_PORTS must be comma-separated port numbers, got {ports_raw!r}")
    networks: tuple[ssrf.IPNetwork, ...] = ()
    try:
        networks = ssrf.parse_networks(env.str("BELFRY_WEBPUSH_ALLOW_NETWORKS", ""))
    except ValueError as exc:
        env.problem(f"BELFRY_WEBPUSH_ALLOW_NETWORKS must be comma-separated networks (CIDR): {exc}")
    key = env.str("BELFRY_VAPID_PRIVATE_KEY", "").replace("\\n", "\n")
    key_file_raw = env.str("BELFRY_VAPID_PRIVATE_KEY_FILE", "")
    if not key and not key_file_raw:
        env.problem("set BELFRY_VAPID_PRIVATE_KEY (PEM) or BELFRY_VAPID_PRIVATE_KEY_FILE (created when missing)")
    subject = env.str("BELFRY_VAPID_SUBJECT", "mailto:notifications@localhost")
    if not subject.startswith(("mailto:", "https://")):
        env.problem("BELFRY_VAPID_SUBJECT must be a mailto: or https: URL (RFC 8292)")
    settings = Settings(
        common=common,
        policy=ssrf.Policy(
            allowed_hosts=tuple(h.strip().lower() for h in hosts.split(",") if h.strip()),
            allowed_ports=ports,
            allowed_networks=networks,
        ),
        ca_file=env.path("BELFRY_WEBPUSH_CA_FILE"),
        vapid_private_key=key,
        vapid_key_file=Path(key_file_raw) if key_file_raw else None,
        vapid_subject=subject,
        vapid_other_keys=_other_vapid_keys(env),
        default_ttl_seconds=env.int("BELFRY_WEBPUSH_TTL_SECONDS", 86400, minimum=0),
        sender=load_sender_settings(env, common, "webpush", batch=200, concurrency=100, lease_seconds=60.0),
        timeout_seconds=env.float("BELFRY_WEBPUSH_TIMEOUT_SECONDS", 10.0, minimum=0.1),
        max_connections=env.int("BELFRY_WEBPUSH_MAX_CONNECTIONS", 200, minimum=1),
        max_subscriptions_per_user=env.int(
            "BELFRY_WEBPUSH_MAX_SUBSCRIPTIONS_PER_USER", store.DEFAULT_MAX_PER_USER, minimum=1
        ),
        opener=openlink.signer_from(env, required=False),
    )
    env.check()
    return settings


def _other_vapid_keys(env: Env) -> tuple[str, ...]:
    """``BELFRY_VAPID_OTHER_KEYS`` (PEM blocks) and ``BELFRY_VAPID_OTHER_KEY_FILES`` (paths), as PEM texts."""
    text = env.str("BELFRY_VAPID_OTHER_KEYS", "").replace("\\n", "\n")
    files = tuple(Path(p.strip()) for p in env.str("BELFRY_VAPID_OTHER_KEY_FILES", "").split(",") if p.strip())
    try:
        keys = vapid.parse_keys(text, files)
    except (OSError, ValueError) as exc:
        env.problem(f"BELFRY_VAPID_OTHER_KEYS / BELFRY_VAPID_OTHER_KEY_FILES: {exc}")
        return ()
    return tuple(
        k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        for k in keys
    )
