"""Signed short-lived user tokens (JWT, HS256, with a key id).

A token names an account and a user, nothing more: roles, tier and tool
access are always looked up in the directory, never read from a request.
Keys carry an id (``kid``) so a new key can be added, made active, and the
old one retired once its last tokens expired, without logging anyone out.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import jwt

from belfry.errors import Unauthenticated

AUDIENCE = "belfry"
ISSUER = "belfry"
_ALGORITHM = "HS256"


@dataclass(frozen=True)
class Caller:
    """Who is calling, as the verified token says."""

    account_id: str
    user_id: str


class TokenIssuer:
    """Signs tokens with the active key."""

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
    """Checks signature, key id, audience, issuer and expiry."""

    def __init__(self, keys: dict[str, bytes], *, leeway_seconds: int = 5) -> None:
        self._keys = dict(keys)
        self._leeway = leeway_seconds

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
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("the token has expired; sign in again") from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"the token is invalid: {exc}") from exc
        account, user = claims.get("acc"), claims.get("sub")
        if not isinstance(account, str) or not account or not isinstance(user, str) or not user:
            raise Unauthenticated("the token does not name an account and a user")
        return Caller(account, user), int(claims["exp"])

    def from_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
        """The caller named by an ``authorization: Bearer <token>`` metadata entry."""
        for name, value in metadata or ():
            if name.lower() == "authorization":
                text = value.decode() if isinstance(value, bytes) else value
                scheme, _, token = text.partition(" ")
                if scheme.lower() != "bearer" or not token.strip():
                    raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
                return self.verify(token.strip())[0]
        raise Unauthenticated("this call needs a user token in the 'authorization' metadata")
