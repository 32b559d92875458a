"""Whom a service trusts, read from the environment with the rest of the common settings.

Two questions, two blocks:

* **User tokens** (:class:`UserTokenSettings`): in production the host
  application's identity provider signs them (OIDC discovery + JWKS, ES256,
  EdDSA or RS256); the HS256 keys of ``BELFRY_TOKEN_KEYS`` exist only for
  ``belfry up`` and the dev sign-in, and production refuses them.
* **Callers** (:class:`MeshSettings`): which service-token keys verify a peer
  where mutual TLS is off, the SPIFFE trust domain of certificates, and which
  configured identities hold which role of ``belfry.access``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ed25519

from belfry import access, identity
from belfry.errors import ConfigError, Unauthenticated

if TYPE_CHECKING:
    from belfry.config import Env

ALGORITHMS = ("ES256", "EdDSA", "RS256")


@dataclass(frozen=True)
class OidcSettings:
    """The host application's identity provider."""

    issuer: str
    audience: str
    account_claim: str = "acc"
    user_claim: str = "sub"
    algorithms: tuple[str, ...] = ALGORITHMS
    jwks_uri: str = ""  # empty: from the issuer's discovery document
    refresh_seconds: float = 30.0  # an unknown kid fetches the keys again at most this often
    cache_seconds: float = 3600.0  # keys older than this are fetched again


@dataclass(frozen=True)
class UserTokenSettings:
    """How user tokens are verified: OIDC when configured, else the HS256 keys of local runs."""

    oidc: OidcSettings | None = None
    leeway_seconds: int = 30  # clock skew allowed on exp, iat and nbf
    max_lifetime_seconds: int = 86_400  # a token whose exp - iat exceeds this is refused


@dataclass(frozen=True)
class MeshSettings:
    """How peers prove who they are, and the roles configured identities hold."""

    token_keys: tuple[tuple[str, ed25519.Ed25519PublicKey], ...] = ()  # verify peers' service tokens
    trust_domain: str = identity.DEFAULT_TRUST_DOMAIN
    callers: access.Callers = field(default_factory=access.Callers)

    def verifier(self) -> identity.ServiceTokenVerifier | None:
        """The service-token verifier, or None when no key is configured (then only certificates identify)."""
        if not self.token_keys:
            return None
        return identity.ServiceTokenVerifier(dict(self.token_keys))


def load_user_tokens(env: Env, *, production: bool, hs256: bool) -> UserTokenSettings:
    """``BELFRY_OIDC_*`` and the limits every user token obeys; production needs OIDC and refuses HS256."""
    issuer = env.str("BELFRY_OIDC_ISSUER", "")
    audience = env.str("BELFRY_OIDC_AUDIENCE", "")
    oidc = None
    if issuer or audience:
        algorithms = tuple(a.strip() for a in env.str("BELFRY_OIDC_ALGORITHMS", ",".join(ALGORITHMS)).split(","))
        wrong = [a for a in algorithms if a not in ALGORITHMS]
        if wrong:
            env.problem(f"BELFRY_OIDC_ALGORITHMS may name only {', '.join(ALGORITHMS)}; not {', '.join(wrong)}")
        if not issuer or not audience:
            env.problem("BELFRY_OIDC_ISSUER and BELFRY_OIDC_AUDIENCE go together")
        scheme = urlsplit(issuer).scheme
        if scheme not in {"https", "http"} or (production and scheme != "https"):
            env.problem(f"BELFRY_OIDC_ISSUER must be an {'https' if production else 'http(s)'} URL, got {issuer!r}")
        oidc = OidcSettings(
            issuer=issuer,
            audience=audience,
            account_claim=env.str("BELFRY_OIDC_ACCOUNT_CLAIM", "acc"),
            user_claim=env.str("BELFRY_OIDC_USER_CLAIM", "sub"),
            algorithms=tuple(a for a in algorithms if a in ALGORITHMS),
            jwks_uri=env.str("BELFRY_OIDC_JWKS_URI", ""),
            refresh_seconds=env.float("BELFRY_OIDC_REFRESH_SECONDS", 30.0, minimum=1.0),
            cache_seconds=env.float("BELFRY_OIDC_CACHE_SECONDS", 3600.0, minimum=1.0),
        )
    if production and hs256:
        env.problem(
            "BELFRY_TOKEN_KEYS (HS256 user tokens) is for local runs only; "
            "in production user tokens come from the identity provider (BELFRY_OIDC_ISSUER)"
        )
    if production and oidc is None:
        env.problem("BELFRY_PRODUCTION=true needs the identity provider: BELFRY_OIDC_ISSUER and BELFRY_OIDC_AUDIENCE")
    return UserTokenSettings(
        oidc=oidc,
        leeway_seconds=env.int("BELFRY_TOKEN_LEEWAY_SECONDS", 30),
        max_lifetime_seconds=env.int("BELFRY_TOKEN_MAX_LIFETIME_SECONDS", 86_400, minimum=60),
    )


def _roles(env: Env) -> access.Callers:
    try:
        producers = access.parse_producers(env.str("BELFRY_PRODUCERS", ""))
    except ValueError as exc:
        env.problem(f"BELFRY_PRODUCERS: {exc}")
        producers = {}
    names: dict[str, frozenset[str]] = {}
    for role, variable in (
        ("provisioning", "BELFRY_PROVISIONING"),
        ("apps", "BELFRY_APPS"),
        ("operators", "BELFRY_OPERATORS"),
    ):
        try:
            names[role] = access.parse_names(env.str(variable, ""))
        except ValueError as exc:
            env.problem(f"{variable}: {exc}")
            names[role] = frozenset()
    return access.Callers(producers, names["provisioning"], names["apps"], names["operators"])


def load_mesh(env: Env, *, service: str, services: frozenset[str], own_token: str) -> MeshSettings:
    """``BELFRY_SERVICE_TOKEN_KEYS``, ``BELFRY_TRUST_DOMAIN`` and the role bindings; checks our own token."""
    raw = env.str("BELFRY_SERVICE_TOKEN_KEYS", "")
    try:
        keys = identity.parse_public_keys(raw)
    except ConfigError as exc:
        env.problem(exc.message)
        keys = {}
    callers = _roles(env)
    taken = sorted(callers.names() & (services | set(access.ROLES)))
    if taken:
        env.problem(f"configured caller identities may not be named like a service or a role: {', '.join(taken)}")
    if own_token and keys:
        # A token for another name, or an expired one, would fail on every peer: say so at start instead.
        try:
            named = identity.ServiceTokenVerifier(keys, leeway_seconds=0).identity(own_token)
        except Unauthenticated as exc:
            env.problem(f"BELFRY_SERVICE_TOKEN does not verify against BELFRY_SERVICE_TOKEN_KEYS: {exc.message}")
        else:
            if service in services and named != service:
                env.problem(f"BELFRY_SERVICE_TOKEN names {named!r}, but this is the {service} service")
    return MeshSettings(
        token_keys=tuple(keys.items()),
        trust_domain=env.str("BELFRY_TRUST_DOMAIN", identity.DEFAULT_TRUST_DOMAIN),
        callers=callers,
    )
