"""User tokens: who a user-facing call acts for.

A token names an account and a user, nothing more: roles, tier and tool
access are always looked up in the directory, never read from a request.

* In production the host application's identity provider signs them with an
  asymmetric key (ES256, EdDSA or RS256) it publishes (``belfry.oidc``).
* ``belfry up`` and the dev sign-in use HS256 with local keys
  (:class:`TokenIssuer`, :class:`TokenVerifier`); production refuses those keys.

Both check the signature, issuer, audience, expiry (with a clock-skew
leeway) and a maximum lifetime: a token whose ``exp - iat`` exceeds it is
refused however validly it is signed. :func:`user_tokens` gives a process
its one verifier for its settings.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from belfry.config import CommonSettings
from belfry.errors import ConfigError, Unauthenticated
from belfry.trust import UserTokenSettings

AUDIENCE = "belfry"
ISSUER = "belfry"
_ALGORITHM = "HS256"
DEFAULT_MAX_LIFETIME = 86_400


@dataclass(frozen=True)
class Caller:
    """Who is calling, as the verified token says."""

    account_id: str
    user_id: str


def caller_from_claims(
    claims: Mapping[str, Any], *, account_claim: str, user_claim: str, max_lifetime: int, leeway: int
) -> tuple[Caller, int]:
    """The caller and expiry of verified claims; Unauthenticated when the lifetime or the names are wrong."""
    issued, expires = claims.get("iat"), claims.get("exp")
    if not isinstance(issued, int) or not isinstance(expires, int):
        raise Unauthenticated("the token must carry numeric iat and exp")
    if expires - issued > max_lifetime:
        raise Unauthenticated(f"the token lives longer than the {max_lifetime} s allowed (exp - iat)")
    if issued > time.time() + leeway:
        raise Unauthenticated("the token was issued in the future; check the issuer's clock")
    account, user = claims.get(account_claim), claims.get(user_claim)
    if not isinstance(account, str) or not account or not isinstance(user, str) or not user:
        raise Unauthenticated(f"the token does not name an account ({account_claim!r}) and a user ({user_claim!r})")
    return Caller(account, user), expires


def refusal(exc: jwt.PyJWTError) -> Unauthenticated:
    """What a person can act on, for a token PyJWT refused."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return Unauthenticated("the token has expired; sign in again")
    if isinstance(exc, jwt.ImmatureSignatureError):
        return Unauthenticated("the token was issued in the future; check the issuer's clock")
    if isinstance(exc, jwt.InvalidAudienceError):
        return Unauthenticated("the token is for another audience than this deployment's")
    if isinstance(exc, jwt.InvalidIssuerError):
        return Unauthenticated("the token comes from another issuer than the configured one")
    return Unauthenticated(f"the token is invalid: {exc}")


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry; None when there is no such entry."""
    for name, value in metadata or ():
        if name.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
            return token.strip()
    return None


class TokenIssuer:
    """Signs local (HS256) tokens with the active key: ``belfry token`` and the dev sign-in."""

    def __init__(self, keys: dict[str, bytes], active_kid: str, ttl_seconds: int = 900) -> None:
        if active_kid not in keys:
            raise ValueError(f"active key id {active_kid!r} is not among the configured keys")
        self._key = keys[active_kid]
        self._kid = active_kid
        self._ttl = ttl_seconds

    def issue(self, account_id: str, user_id: str, *, now: float | None = None) -> str:
        """A token for (account, user), valid for the configured time to live."""
        issued = int(time.time() if now is None else now)
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "acc": account_id,
            "sub": user_id,
            "iat": issued,
            "exp": issued + self._ttl,
        }
        return jwt.encode(claims, self._key, algorithm=_ALGORITHM, headers={"kid": self._kid})


class TokenVerifier:
    """Verifies user tokens; this class checks local (HS256) ones, ``belfry.oidc.OidcVerifier`` the provider's.

    Local keys carry an id (``kid``) so a new key can be added, made active,
    and the old one retired once its last tokens expired, without logging
    anyone out. Signature, key id, audience, issuer, expiry and lifetime are
    checked.

    ``verify`` works with the keys at hand (call sites that cannot await use
    it); ``authenticate`` may fetch the issuer's keys first, so a token signed
    with a key published a moment ago passes on its first use. The kit's RPC
    interceptor calls ``prepare`` before every handler that receives a token.
    """

    def __init__(
        self, keys: dict[str, bytes], *, leeway_seconds: int = 5, max_lifetime_seconds: int = DEFAULT_MAX_LIFETIME
    ) -> None:
        self._keys = dict(keys)
        self._leeway = leeway_seconds
        self._max_lifetime = max_lifetime_seconds

    def verify(self, token: str) -> tuple[Caller, int]:
        """The caller and the token's expiry (epoch seconds); Unauthenticated on any flaw."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated("the token is malformed") from exc
        key = self._keys.get(str(header.get("kid", "")))
        # The algorithm is fixed here, never taken from the header: "none" and
        # algorithm-confusion tokens fail the signature check below.
        if key is None or header.get("alg") != _ALGORITHM:
            raise Unauthenticated("the token was not signed by a known key")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[_ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "sub", "aud", "iss"]},
            )
        except jwt.PyJWTError as exc:
            raise refusal(exc) from exc
        return caller_from_claims(
            claims, account_claim="acc", user_claim="sub", max_lifetime=self._max_lifetime, leeway=self._leeway
        )

    async def prepare(self, token: str) -> None:
        """Make sure the keys that may verify ``token`` are at hand (a fetch, when one is due)."""

    async def authenticate(self, token: str) -> tuple[Caller, int]:
        """``verify`` after ``prepare``."""
        await self.prepare(token)
        return self.verify(token)

    def from_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
        """The caller named by an ``authorization: Bearer <token>`` metadata entry."""
        token = bearer(metadata)
        if token is None:
            raise Unauthenticated("this call needs a user token in the 'authorization' metadata")
        return self.verify(token)[0]

    async def caller(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
        """``from_metadata`` after ``prepare``."""
        token = bearer(metadata)
        if token is not None:
            await self.prepare(token)
        return self.from_metadata(metadata)


class _Either(TokenVerifier):
    """Development with an identity provider and the dev sign-in: HS256 tokens locally, the rest by the provider."""

    def __init__(self, local: TokenVerifier, provider: TokenVerifier) -> None:
        super().__init__({})
        self._local = local
        self._provider = provider

    def _pick(self, token: str) -> TokenVerifier:
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError as exc:
            raise Unauthenticated("the token is malformed") from exc
        return self._local if alg == _ALGORITHM else self._provider

    def verify(self, token: str) -> tuple[Caller, int]:
        """By the verifier of the token's kind."""
        return self._pick(token).verify(token)

    async def prepare(self, token: str) -> None:
        """By the verifier of the token's kind."""
        await self._pick(token).prepare(token)


def user_tokens(common: CommonSettings) -> TokenVerifier:
    """This process's verifier for its settings (one per configuration: keys fetched once, shared)."""
    return _verifier(tuple(sorted(common.token_keys.items())), common.user_tokens)


@functools.cache
def _verifier(keys: tuple[tuple[str, bytes], ...], settings: UserTokenSettings) -> TokenVerifier:
    local = (
        TokenVerifier(
            dict(keys), leeway_seconds=settings.leeway_seconds, max_lifetime_seconds=settings.max_lifetime_seconds
        )
        if keys
        else None
    )
    if settings.oidc is None:
        if local is None:
            raise ConfigError(
                "this service verifies user tokens: set BELFRY_OIDC_ISSUER and BELFRY_OIDC_AUDIENCE "
                "(or BELFRY_TOKEN_KEYS for a local run)"
            )
        return local
    from belfry.oidc import OidcVerifier  # noqa: PLC0415 - belfry.oidc imports this module

    provider = OidcVerifier(
        settings.oidc, leeway_seconds=settings.leeway_seconds, max_lifetime_seconds=settings.max_lifetime_seconds
    )
    return provider if local is None else _Either(local, provider)
