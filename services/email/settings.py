"""Settings of the email sender, read once from the environment."""

from __future__ import annotations

import importlib.util
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from email.headerregistry import Address
from email.utils import parseaddr
from pathlib import Path
from urllib.parse import urlsplit

from belfry import unsubscribe
from belfry.config import CommonSettings, Env, load_common
from belfry.queue.sender import SenderSettings, load_sender_settings

from services.email import dkim_signing
from services.email.dkim_signing import DkimKey
from services.email.verp import Verp


@dataclass(frozen=True)
class SmtpSettings:
    """Where and how to hand messages over."""

    host: str
    port: int
    user: str
    password: str
    starttls: bool  # upgrade a plain connection (submission on 587)
    implicit_tls: bool  # TLS from the first byte (465)
    timeout: float
    pool_size: int
    ca_file: Path | None = None  # a private CA for the relay's certificate (default: the system's)


@dataclass(frozen=True)
class BounceSettings:
    """The bounce receiver: an SMTP listener for DSNs and complaints sent to VERP addresses."""

    host: str
    port: int  # 0: any free port (tests); the bound one is logged and kept on the receiver
    max_bytes: int  # a larger message is refused (552) before it is buffered
    soft_limit: int  # this many soft bounces of an address within the window suppress it
    soft_window_seconds: float
    hostname: str  # the name the receiver greets with (the bounce domain)


@dataclass(frozen=True)
class Settings:
    """Everything ``python -m services.email`` needs."""

    common: CommonSettings
    smtp: SmtpSettings
    from_address: Address
    public_url: str  # where the web app is served: preferences page and unsubscribe endpoint
    unsubscribe_key: bytes
    unsubscribe_ttl_seconds: int
    daily_cap: int
    sender: SenderSettings
    soft_expiry_seconds: float = 7 * 86400.0  # a suppression for soft bounces lapses after this
    unsubscribe_other_keys: tuple[bytes, ...] = ()  # also accepted: the next or previous key of a rotation
    verp: Verp | None = None  # per-delivery envelope senders (None: the From address is the envelope sender)
    dkim: tuple[DkimKey, ...] = ()  # every message is signed with each (none: sent unsigned)
    bounces: BounceSettings | None = None  # the bounce receiver (None: off)
    branding_domains: tuple[str, ...] = ()  # more domains accounts may send From (each has a DKIM key)

    @property
    def from_domains(self) -> frozenset[str]:
        """The domains an account's branded From address may use: BELFRY_EMAIL_FROM's and every DKIM key's."""
        return frozenset({(self.from_address.domain or "").lower(), *(k.domain for k in self.dkim)})


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Parse and check the environment; every problem is reported at once."""
    env = Env(environ)
    common = load_common("email", env)
    implicit_tls = env.bool("BELFRY_SMTP_TLS", False)
    smtp = SmtpSettings(
        host=env.str("BELFRY_SMTP_HOST", "localhost"),
        port=env.int("BELFRY_SMTP_PORT", 465 if implicit_tls else 25, minimum=1),
        user=env.str("BELFRY_SMTP_USER", ""),
        password=env.str("BELFRY_SMTP_PASSWORD", ""),
        starttls=env.bool("BELFRY_SMTP_STARTTLS", False),
        implicit_tls=implicit_tls,
        timeout=env.float("BELFRY_SMTP_TIMEOUT", 30.0, minimum=0.1),
        pool_size=env.int("BELFRY_SMTP_POOL_SIZE", 8, minimum=1),
        ca_file=env.path("BELFRY_SMTP_CA"),
    )
    if smtp.starttls and smtp.implicit_tls:
        env.problem("set only one of BELFRY_SMTP_STARTTLS and BELFRY_SMTP_TLS")
    if bool(smtp.user) != bool(smtp.password):
        env.problem("BELFRY_SMTP_USER and BELFRY_SMTP_PASSWORD go together")
    name, addr = parseaddr(env.str("BELFRY_EMAIL_FROM", "Belfry <notifications@localhost>"))
    from_address = Address("Belfry", "notifications", "localhost")
    try:
        from_address = Address(display_name=name, addr_spec=addr)
    except (ValueError, IndexError):
        env.problem("BELFRY_EMAIL_FROM must be an address such as 'Belfry <notifications@example.com>'")
    if "@" not in addr:
        env.problem("BELFRY_EMAIL_FROM must contain an address with a domain")
    public_url = env.str("BELFRY_PUBLIC_URL", "http://localhost:8080")
    problem = public_url_problem(public_url)
    if problem:
        env.problem(problem)
    public_url = public_url.rstrip("/")
    key = env.str("BELFRY_UNSUBSCRIBE_KEY", "")
    if len(key) < 32:
        env.problem(
            "BELFRY_UNSUBSCRIBE_KEY must be set to a secret of at least 32 characters (it signs unsubscribe links)"
        )
    verp_keys = [k.strip() for k in env.str("BELFRY_EMAIL_VERP_KEYS", "").split(",") if k.strip()]
    if any(len(k) < 32 for k in verp_keys):
        env.problem("every key of BELFRY_EMAIL_VERP_KEYS must be a secret of at least 32 characters")
    bounce_domain = env.str("BELFRY_EMAIL_BOUNCE_DOMAIN", from_address.domain or "localhost").lower()
    verp = Verp([k.encode() for k in verp_keys], bounce_domain) if verp_keys else None
    from_domain = (from_address.domain or "").lower()
    # The domains mail is sent under: the From address's, and the envelope sender's (VERP's bounce domain).
    branding_domains = _branding_domains(env, from_domain)
    sending_domains = {from_domain, verp.domain if verp else from_domain, *branding_domains}
    dkim = dkim_signing.load_keys(env, sending_domains)
    unsigned = [d for d in branding_domains if d not in {k.domain for k in dkim}]
    if unsigned:
        # Mail From such a domain would go out unsigned and fail DMARC alignment.
        env.problem(
            f"BELFRY_EMAIL_BRANDING_DOMAINS: {', '.join(unsigned)} need a key in {dkim_signing.VARIABLE} "
            "(mail From them must be signed by them)"
        )
    settings = Settings(
        common=common,
        smtp=smtp,
        from_address=from_address,
        public_url=public_url,
        unsubscribe_key=key.encode(),
        unsubscribe_ttl_seconds=env.int("BELFRY_UNSUBSCRIBE_TTL_SECONDS", 60 * 86400, minimum=3600),
        daily_cap=env.int("BELFRY_EMAIL_DAILY_CAP", 1000, minimum=1),
        sender=load_sender_settings(env, common, "email", batch=200, concurrency=64, lease_seconds=60.0),
        soft_expiry_seconds=env.float("BELFRY_EMAIL_SOFT_SUPPRESSION_SECONDS", 7 * 86400.0, minimum=0.0),
        unsubscribe_other_keys=_other_unsubscribe_keys(env),
        verp=verp,
        dkim=dkim,
        bounces=_bounce_settings(env, verp),
        branding_domains=branding_domains,
    )
    env.check()
    return settings


def _branding_domains(env: Env, from_domain: str) -> tuple[str, ...]:
    """``BELFRY_EMAIL_BRANDING_DOMAINS``: comma-separated domains accounts may also use in their From address."""
    found: list[str] = []
    for domain in (d.strip().lower() for d in env.str("BELFRY_EMAIL_BRANDING_DOMAINS", "").split(",")):
        if not domain or domain == from_domain or domain in found:
            continue
        if not dkim_signing.is_domain(domain):
            env.problem(f"BELFRY_EMAIL_BRANDING_DOMAINS: {domain!r} is not a domain name")
            continue
        found.append(domain)
    return tuple(found)


# Set by the pod's parent process (``belfry.processes``, ``BELFRY_PROCESSES`` > 1): the port it
# reserved for BELFRY_EMAIL_BOUNCE_ADDRESS, which every worker then binds with SO_REUSEPORT.
BOUNCE_PORT_VARIABLE = "BELFRY_EMAIL_BOUNCE_PORT"


def _bounce_settings(env: Env, verp: Verp | None) -> BounceSettings | None:
    address = env.address("BELFRY_EMAIL_BOUNCE_ADDRESS", "off", off=True)
    max_bytes = env.int("BELFRY_EMAIL_BOUNCE_MAX_BYTES", 1024 * 1024, minimum=16 * 1024)
    soft_limit = env.int("BELFRY_EMAIL_SOFT_BOUNCE_LIMIT", 5, minimum=1)
    soft_window = env.float("BELFRY_EMAIL_SOFT_BOUNCE_WINDOW_SECONDS", 7 * 86400.0, minimum=60.0)
    if not address:
        return None
    if verp is None:
        # Without VERP no envelope names a delivery, so every report would be refused.
        env.problem("BELFRY_EMAIL_BOUNCE_ADDRESS needs BELFRY_EMAIL_VERP_KEYS (bounces are matched by VERP address)")
    if importlib.util.find_spec("aiosmtpd") is None:
        # aiosmtpd is in the `local` extra, not a main dependency: only a receiver that is on needs it.
        env.problem("BELFRY_EMAIL_BOUNCE_ADDRESS needs the aiosmtpd package (pip install 'aiosmtpd>=1.4')")
    host, _, port = address.rpartition(":")
    bound = env.int(BOUNCE_PORT_VARIABLE, int(port))
    return BounceSettings(
        host.strip("[]"), bound, max_bytes, soft_limit, soft_window, verp.domain if verp else "localhost"
    )


def _loopback(host: str) -> bool:
    """``localhost``, a ``.localhost`` name (RFC 6761) or a loopback address."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def public_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be the base of List-Unsubscribe links, or None when it can.

    RFC 8058 one-click unsubscribe links must be https. Plain http is
    accepted only for a loopback host: a development run whose mail never
    leaves the machine (``belfry up``, a port-forwarded dev cluster).
    """
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:
        parts, host = None, ""
    if parts is None or parts.scheme not in ("https", "http") or not host:
        return f"BELFRY_PUBLIC_URL must be an https:// URL such as https://notifications.example.com, got {url!r}"
    if parts.scheme == "http" and not _loopback(host):
        return (
            f"BELFRY_PUBLIC_URL must be https:// (RFC 8058 one-click unsubscribe links are https only), got {url!r}; "
            "plain http:// is accepted only for a loopback development host (localhost, 127.0.0.1, [::1])"
        )
    return None


def _other_unsubscribe_keys(env: Env) -> tuple[bytes, ...]:
    """``BELFRY_UNSUBSCRIBE_OTHER_KEYS``: keys links are also accepted under during a rotation."""
    try:
        return unsubscribe.parse_keys(env.str("BELFRY_UNSUBSCRIBE_OTHER_KEYS", ""))
    except ValueError as exc:
        env.problem(f"BELFRY_UNSUBSCRIBE_OTHER_KEYS: {exc}")
        return ()
