"""Configuration from the environment, parsed once, failing fast.

Every service builds a frozen settings dataclass through ``Env``, which
collects *every* problem before raising, so an operator fixes a broken
deployment in one pass instead of one variable at a time.
"""

from __future__ import annotations

import builtins
import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

from cryptography import x509

from belfry import trust
from belfry.errors import ConfigError
from belfry.processes import PROCESSES, SLOT, available_cpus


class Env:
    """Typed reads from an environment mapping; ``check()`` raises all problems at once."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ
        self._problems: list[str] = []
        # Every variable read, with its default as documented (None: required); a Recorder collects them.
        self.reads: dict[builtins.str, builtins.str | None] = environ.reads if isinstance(environ, Recorder) else {}

    def _note(self, name: builtins.str, default: object) -> None:
        if name not in self.reads:
            self.reads[name] = None if default is None else _shown(default)

    def str(self, name: builtins.str, default: builtins.str | None = None) -> builtins.str:
        """A string; missing without a default is a problem."""
        self._note(name, default)
        value = self._environ.get(name, "").strip()
        if value:
            return value
        if default is None:
            self._problems.append(f"{name} is required but not set")
            return ""
        return default

    def int(self, name: builtins.str, default: builtins.int, *, minimum: builtins.int = 0) -> builtins.int:
        """An integer no smaller than ``minimum``."""
        self._note(name, default)
        raw = self._environ.get(name, "").strip()
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            self._problems.append(f"{name} must be an integer, got {raw!r}")
            return default
        if value < minimum:
            self._problems.append(f"{name} must be at least {minimum}, got {value}")
        return value

    def float(self, name: builtins.str, default: builtins.float, *, minimum: builtins.float = 0.0) -> builtins.float:
        """A number no smaller than ``minimum``."""
        self._note(name, default)
        raw = self._environ.get(name, "").strip()
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            self._problems.append(f"{name} must be a number, got {raw!r}")
            return default
        if value < minimum:
            self._problems.append(f"{name} must be at least {minimum}, got {value}")
        return value

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        """``1/true/yes/on`` or ``0/false/no/off``."""
        self._note(name, default)
        raw = self._environ.get(name, "").strip().lower()
        if not raw:
            return default
        if raw in {"1", "true", "yes", "on"}:
            return True
        if raw in {"0", "false", "no", "off"}:
            return False
        self._problems.append(f"{name} must be true or false, got {raw!r}")
        return default

    def path(self, name: builtins.str) -> Path | None:
        """An optional path to an existing file."""
        self._note(name, "")
        raw = self._environ.get(name, "").strip()
        if not raw:
            return None
        path = Path(raw)
        if not path.is_file():
            self._problems.append(f"{name} points to {raw!r}, which is not a readable file")
        return path

    def choice(self, name: builtins.str, default: builtins.str, choices: tuple[builtins.str, ...]) -> builtins.str:
        """One of ``choices`` (case-insensitive), returned in lower case."""
        value = self.str(name, default).lower()
        if value not in choices:
            self._problems.append(f"{name} must be one of {', '.join(choices)}, got {value!r}")
            return default
        return value

    def address(self, name: builtins.str, default: builtins.str, *, off: builtins.bool = False) -> builtins.str:
        """``host:port`` (``[v6]:port``; port 0 = any free port); with ``off``, also empty/``off``/``none``."""
        value = self.str(name, default)
        if off and value in {"", "off", "none"}:
            return ""
        _host, sep, port = value.rpartition(":")
        if not (sep and port.isdigit() and int(port) <= 65535):
            self._problems.append(
                f"{name} must be host:port (e.g. 0.0.0.0:9464{', or off' if off else ''}), got {value!r}"
            )
            return default
        return value

    def https_url(self, name: builtins.str, default: builtins.str) -> builtins.str:
        """An ``https://host[:port][/path]`` URL (a third-party API Belfry sends credentials to), no trailing slash."""
        value = self.str(name, default).rstrip("/")
        try:
            parts = urlsplit(value)
            ok = parts.scheme == "https" and bool(parts.hostname) and not parts.query and not parts.fragment
            parts.port  # noqa: B018 - raises ValueError on a port out of range
        except ValueError:
            ok = False
        if not ok:
            self._problems.append(f"{name} must be an https:// URL such as {default}, got {value!r}")
            return default
        return value

    def problem(self, message: builtins.str) -> None:
        """Record a problem found by a caller's own validation."""
        self._problems.append(message)

    def check(self) -> None:
        """Raise one ConfigError naming every problem seen so far."""
        if self._problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(self._problems))


class Recorder(dict[str, str]):
    """An environment that remembers every variable an ``Env`` over it reads (``reads``: name → default).

    ``scripts/gen_config_docs.py`` runs each service's settings loader over one
    to list every variable the code reads, with its default.
    """

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        super().__init__(values or {})
        self.reads: dict[str, str | None] = {}


def _shown(default: object) -> str:
    """A default as the documentation shows it."""
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def database_url(env: Env) -> str:
    """``BELFRY_DATABASE_URL``, else ``DATABASE_URL``; a problem when neither is set."""
    url = env.str("BELFRY_DATABASE_URL", "") or env.str("DATABASE_URL", "")
    if not url:
        env.problem("BELFRY_DATABASE_URL (or DATABASE_URL) is required but not set")
    return url


def account_range(env: Env) -> AccountRange:
    """``BELFRY_ACCOUNT_RANGE``: the accounts this replica claims for (default: all)."""
    raw = env.str("BELFRY_ACCOUNT_RANGE", "")
    if not raw:
        return AccountRange()
    try:
        return AccountRange.parse(raw)
    except ValueError as exc:
        env.problem(f"BELFRY_ACCOUNT_RANGE {exc}")
        return AccountRange()


def token_ttl_seconds(env: Env) -> int:
    """``BELFRY_TOKEN_TTL_SECONDS``: the lifetime of the user tokens Belfry issues itself (development sign-in)."""
    return env.int("BELFRY_TOKEN_TTL_SECONDS", 900, minimum=30)


@dataclass(frozen=True)
class TlsSettings:
    """How this process proves who it is to peers (and checks them).

    Mutual TLS material, configured together (``check_tls``): servers then
    require client certificates from the CA. Where TLS is off, the service
    token (``belfry.identity``) that every channel from ``belfry.rpc.connect``
    presents instead.
    """

    cert: Path | None
    key: Path | None
    ca: Path | None
    service_token: str = ""

    @property
    def enabled(self) -> bool:
        """True when a certificate and key are configured."""
        return self.cert is not None and self.key is not None


@dataclass(frozen=True)
class AccountRange:
    """The accounts ``lower <= account_id < upper`` (in the database's byte order); empty bounds are open.

    ``BELFRY_ACCOUNT_RANGE=acc_4..acc_8`` makes a replica claim (deliveries,
    fan-out) only for those accounts, so a deployment can give each group of
    replicas its own share of the tenants; several groups side by side cover
    every account once between them. Unset: every account.
    """

    lower: str = ""
    upper: str = ""

    @classmethod
    def parse(cls, text: str) -> AccountRange:
        """``lower..upper`` (either side may be empty); ValueError names what is wrong."""
        lower, sep, upper = text.strip().partition("..")
        if not sep:
            raise ValueError(f"must be lower..upper (e.g. acc_4..acc_8, ..acc_8 or acc_4..), got {text!r}")
        if upper and lower >= upper:
            raise ValueError(f"the lower bound must come before the upper one, got {text!r}")
        return cls(lower, upper)

    ALL: ClassVar[AccountRange]

    def __contains__(self, account_id: object) -> bool:
        return isinstance(account_id, str) and self.lower <= account_id and (not self.upper or account_id < self.upper)


AccountRange.ALL = AccountRange()


@dataclass(frozen=True)
class CommonSettings:
    """What every service reads: database, listen address, logs, metrics, TLS, tokens."""

    service: str
    database_url: str
    grpc_address: str
    metrics_address: str
    log_level: str
    log_json: bool
    drain_seconds: float
    db_pool_min: int
    db_pool_max: int
    tls: TlsSettings
    token_keys: dict[str, bytes]
    token_active_kid: str
    token_ttl_seconds: int
    # The longest a peer's Retry-After may hold a delivery back (senders clamp to it).
    max_retry_after_seconds: float = 3600.0
    # The accounts this replica's claims (queue, fan-out) take: all of them unless the deployment is sharded.
    accounts: AccountRange = field(default_factory=AccountRange)
    # Worker processes of this service in one pod (belfry.processes); more than one makes this process their parent.
    processes: int = 1
    # In a pod's worker, its slot (set by the parent); None in a lone process or the parent.
    process_slot: int | None = None
    # Plaintext gRPC health only, for kubelet probes (they cannot present a client certificate).
    health_address: str = ""
    # Production refuses HS256 user tokens and needs mutual TLS and the identity provider.
    production: bool = False
    user_tokens: trust.UserTokenSettings = field(default_factory=trust.UserTokenSettings)
    mesh: trust.MeshSettings = field(default_factory=trust.MeshSettings)
    # gRPC server reflection: off unless switched on (it lists every method to whoever reaches the port).
    grpc_reflection: bool = False


def check_tls(env: Env, tls: TlsSettings, *, now: datetime.datetime | None = None) -> None:
    """Record TLS problems at startup: half-configured material, unreadable or expired certificates.

    A certificate that is expired (or not yet valid) would otherwise surface only
    as failed handshakes on the peers, far from the misconfigured service.
    """
    given = {"BELFRY_TLS_CERT": tls.cert, "BELFRY_TLS_KEY": tls.key, "BELFRY_TLS_CA": tls.ca}
    if any(given.values()) and not all(given.values()):
        missing = ", ".join(name for name, path in given.items() if path is None)
        env.problem(f"mutual TLS needs BELFRY_TLS_CERT, BELFRY_TLS_KEY and BELFRY_TLS_CA together; missing {missing}")
    moment = now or datetime.datetime.now(datetime.UTC)
    for name, path in (("BELFRY_TLS_CERT", tls.cert), ("BELFRY_TLS_CA", tls.ca)):
        if path is None or not path.is_file():
            continue
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except ValueError:
            env.problem(f"{name} ({path}) does not hold a PEM certificate")
            continue
        if cert.not_valid_after_utc <= moment:
            env.problem(f"{name} ({path}) expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; renew it")
        elif cert.not_valid_before_utc > moment:
            env.problem(f"{name} ({path}) is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")


def parse_token_keys(raw: str) -> dict[str, bytes]:
    """``kid1=secret1,kid2=secret2`` → {kid: secret}. Several keys allow rotation."""
    keys: dict[str, bytes] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        kid, sep, secret = part.partition("=")
        if not sep or not kid or len(secret) < 32:
            raise ConfigError("BELFRY_TOKEN_KEYS entries must be kid=secret with a secret of at least 32 characters")
        keys[kid] = secret.encode()
    return keys


def load_common(service: str, env: Env, *, default_port: int | None = None) -> CommonSettings:
    """Read the settings shared by every service (call ``env.check()`` after service-specific reads).

    The gRPC port defaults to ``default_port``, else to the one the service declares.
    """
    from belfry.service import declaration, declared  # noqa: PLC0415 - belfry.service imports this module

    if default_port is None:
        default_port = declaration(service).port
    raw_keys = env.str("BELFRY_TOKEN_KEYS", "")
    try:
        keys = parse_token_keys(raw_keys)
    except ConfigError as exc:
        env.problem(exc.message)
        keys = {}
    active = env.str("BELFRY_TOKEN_ACTIVE_KID", next(iter(keys), ""))
    if keys and active not in keys:
        env.problem(f"BELFRY_TOKEN_ACTIVE_KID={active!r} is not one of the kids in BELFRY_TOKEN_KEYS")
    own_token = env.str("BELFRY_SERVICE_TOKEN", "")
    tls = TlsSettings(env.path("BELFRY_TLS_CERT"), env.path("BELFRY_TLS_KEY"), env.path("BELFRY_TLS_CA"), own_token)
    check_tls(env, tls)
    production = env.bool("BELFRY_PRODUCTION", False)
    if production and not tls.enabled:
        env.problem("BELFRY_PRODUCTION=true needs mutual TLS (BELFRY_TLS_CERT, BELFRY_TLS_KEY, BELFRY_TLS_CA)")
    services = frozenset(d.name for d in declared())
    return CommonSettings(
        service=service,
        database_url=database_url(env),
        grpc_address=env.address("BELFRY_GRPC_ADDRESS", f"[::]:{default_port}"),
        metrics_address=env.address("BELFRY_METRICS_ADDRESS", "0.0.0.0:9464", off=True),
        log_level=env.choice("BELFRY_LOG_LEVEL", "info", LOG_LEVELS),
        log_json=env.bool("BELFRY_LOG_JSON", True),
        drain_seconds=env.float("BELFRY_DRAIN_SECONDS", 10.0),
        processes=env.int(PROCESSES, available_cpus(), minimum=1),
        process_slot=slot if (slot := env.int(SLOT, -1, minimum=0)) >= 0 else None,
        db_pool_min=env.int("BELFRY_DB_POOL_MIN", 2, minimum=1),
        db_pool_max=env.int("BELFRY_DB_POOL_MAX", 10, minimum=1),
        tls=tls,
        token_keys=keys,
        token_active_kid=active,
        token_ttl_seconds=token_ttl_seconds(env),
        health_address=env.address("BELFRY_HEALTH_ADDRESS", "", off=True),
        max_retry_after_seconds=env.float("BELFRY_MAX_RETRY_AFTER_SECONDS", 3600.0, minimum=1.0),
        accounts=account_range(env),
        production=production,
        user_tokens=trust.load_user_tokens(env, production=production, hs256=bool(keys)),
        mesh=trust.load_mesh(env, service=service, services=services, own_token=own_token),
        grpc_reflection=env.bool("BELFRY_GRPC_REFLECTION", False),
    )
