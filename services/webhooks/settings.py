"""Settings of the webhooks sender, read once from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from belfry import ssrf
from belfry.config import CommonSettings, Env, load_common
from belfry.queue.sender import SenderSettings, load_sender_settings

from services.webhooks import signing, store


@dataclass(frozen=True)
class Settings:
    """Everything ``python -m services.webhooks`` needs."""

    common: CommonSettings
    policy: ssrf.Policy
    ca_file: Path | None
    secret_key: str  # base64 of 32 bytes: encrypts signing secrets at rest
    secret_key_file: Path | None  # generated on first run when missing (local defaults)
    secret_other_keys: tuple[bytes, ...]  # also open secrets: the next or previous key of a rotation
    sender: SenderSettings
    timeout_seconds: float
    max_per_user: int  # webhooks one user may connect


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Parse and check the environment; every problem is reported at once."""
    env = Env(environ)
    common = load_common("webhooks", env)
    ports_raw = env.str("BELFRY_WEBHOOKS_ALLOWED_PORTS", "443")
    ports: tuple[int, ...] = (443,)
    try:
        ports = tuple(int(p) for p in ports_raw.split(",") if p.strip())
    except ValueError:
        env.problem(f"BELFRY_WEBHOOKS_ALLOWED_PORTS must be comma-separated port numbers, got {ports_raw!r}")
    networks: tuple[ssrf.IPNetwork, ...] = ()
    try:
        networks = ssrf.parse_networks(env.str("BELFRY_WEBHOOKS_ALLOW_NETWORKS", ""))
    except ValueError as exc:
        env.problem(f"BELFRY_WEBHOOKS_ALLOW_NETWORKS must be comma-separated networks (CIDR): {exc}")
    key = env.str("BELFRY_WEBHOOK_SECRET_KEY", "")
    key_file = env.str("BELFRY_WEBHOOK_SECRET_KEY_FILE", "")
    if not key and not key_file:
        env.problem(
            "set BELFRY_WEBHOOK_SECRET_KEY (base64 of 32 random bytes) or BELFRY_WEBHOOK_SECRET_KEY_FILE"
            " (created when missing); it encrypts webhook signing secrets at rest"
        )
    settings = Settings(
        common=common,
        # Any public HTTPS host: users connect their own endpoints. Hosts can still be narrowed.
        policy=ssrf.Policy(
            allowed_hosts=tuple(
                h.strip().lower() for h in env.str("BELFRY_WEBHOOKS_ALLOWED_HOSTS", "").split(",") if h.strip()
            ),
            allowed_ports=ports,
            allowed_networks=networks,
        ),
        ca_file=env.path("BELFRY_WEBHOOKS_CA_FILE"),
        secret_key=key,
        secret_key_file=Path(key_file) if key_file else None,
        secret_other_keys=_other_keys(env),
        sender=load_sender_settings(env, common, "webhooks", batch=100, concurrency=50, lease_seconds=60.0),
        timeout_seconds=env.float("BELFRY_WEBHOOKS_TIMEOUT_SECONDS", 10.0, minimum=0.1),
        max_per_user=env.int("BELFRY_WEBHOOKS_MAX_PER_USER", store.DEFAULT_MAX_PER_USER, minimum=1),
    )
    env.check()
    return settings


def _other_keys(env: Env) -> tuple[bytes, ...]:
    """``BELFRY_WEBHOOK_SECRET_OTHER_KEYS``: keys secrets are also opened with during a rotation."""
    try:
        return signing.parse_keys(env.str("BELFRY_WEBHOOK_SECRET_OTHER_KEYS", ""))
    except ValueError as exc:
        env.problem(f"BELFRY_WEBHOOK_SECRET_OTHER_KEYS: {exc}")
        return ()
