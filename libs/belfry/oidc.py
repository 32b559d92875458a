"""User tokens from the host application's identity provider (OpenID Connect).

The provider signs with an asymmetric key (ES256, EdDSA or RS256) and
publishes the public keys: its discovery document
(``<issuer>/.well-known/openid-configuration``) names the JWKS, which lists
them by ``kid``. Belfry holds no secret that could mint a user token.

Keys are fetched on first use and kept; they are fetched again when a token
names a ``kid`` not in the set (the provider rotated), at most once per
``refresh_seconds`` however many such tokens arrive (a flood of made-up kids
cannot turn into a flood of requests to the provider), and in the background
once they are older than ``cache_seconds``. A failed fetch keeps the keys at
hand. Every token is checked for issuer, audience, expiry with a clock-skew
leeway, the configured account and user claims, and a maximum lifetime.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt

from belfry import log
from belfry.auth import Caller, TokenVerifier, caller_from_claims, refusal
from belfry.errors import Unauthenticated
from belfry.trust import OidcSettings

_LOG = log.get(__name__)
_TIMEOUT = 5.0
_MAX_DOCUMENT = 512 * 1024  # a discovery document or JWKS is a few KiB


class OidcVerifier(TokenVerifier):
    """Verifies the provider's tokens against its published keys."""

    def __init__(
        self,
        settings: OidcSettings,
        *,
        leeway_seconds: int = 30,
        max_lifetime_seconds: int = 86_400,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__({}, leeway_seconds=leeway_seconds, max_lifetime_seconds=max_lifetime_seconds)
        self._settings = settings
        self._clock = clock
        self._transport = transport
        self._published: dict[str, jwt.PyJWK] = {}
        self._jwks_uri = settings.jwks_uri
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None  # the last fetch started while no keys were at hand
        self._missed_at: float | None = None  # the last fetch started for an unknown kid
        self._inflight: asyncio.Task[None] | None = None

    def _header(self, token: str) -> tuple[str, str]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated("the token is malformed") from exc
        alg, kid = header.get("alg"), header.get("kid")
        # Only the configured asymmetric algorithms: "none" and HS256 made with a public key never pass.
        if not isinstance(alg, str) or alg not in self._settings.algorithms:
            raise Unauthenticated(f"the token's algorithm {alg!r} is not accepted")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("the token names no key (kid)")
        return alg, kid

    def verify(self, token: str) -> tuple[Caller, int]:
        """The caller and expiry, with the keys at hand; an unknown kid also starts a (bounded) fetch."""
        alg, kid = self._header(token)
        key = self._published.get(kid)
        if key is None:
            self._refresh_soon()
            raise Unauthenticated(f"the token was signed by a key the issuer does not publish (kid {kid!r})")
        if key.algorithm_name != alg:
            raise Unauthenticated(f"key {kid!r} is for {key.algorithm_name}, not {alg}")
        s = self._settings
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=s.audience,
                issuer=s.issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            raise refusal(exc) from exc
        return caller_from_claims(
            claims,
            account_claim=s.account_claim,
            user_claim=s.user_claim,
            max_lifetime=self._max_lifetime,
            leeway=self._leeway,
        )

    async def prepare(self, token: str) -> None:
        """Fetch the keys first when the token's kid is unknown and a fetch is allowed now."""
        try:
            _, kid = self._header(token)
        except Unauthenticated:
            return  # verify says why
        if kid in self._published:
            if self._stale():
                self._refresh_soon(aged=True)
            return
        if self._may_fetch():
            await self._refresh()

    def _stale(self) -> bool:
        return self._fetched_at is None or self._clock() - self._fetched_at >= self._settings.cache_seconds

    def _may_fetch(self) -> bool:
        """Whether an unknown kid (or having no keys yet) may start a fetch now.

        Misses are budgeted apart from the first fetch: the first token of a
        rotated key is fetched for at once, even just after the keys came.
        """
        if self._inflight is not None and not self._inflight.done():
            return True  # join it
        last = self._missed_at if self._fetched_at is not None else self._attempted_at
        return last is None or self._clock() - last >= self._settings.refresh_seconds

    def _refresh_soon(self, *, aged: bool = False) -> None:
        """Start a fetch in the background when one is allowed (call sites that cannot await)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        if aged or self._may_fetch():
            self._start(aged=aged)

    def _start(self, *, aged: bool = False) -> asyncio.Task[None]:
        loop = asyncio.get_running_loop()
        task = self._inflight
        if task is None or task.done() or task.get_loop() is not loop:
            if self._fetched_at is None:
                self._attempted_at = self._clock()
            elif not aged:
                self._missed_at = self._clock()
            task = self._inflight = loop.create_task(self._fetch())
        return task

    async def _refresh(self) -> None:
        # One fetch at a time: callers that arrive meanwhile wait for the same one.
        await asyncio.shield(self._start())

    async def _fetch(self) -> None:
        try:
            async with httpx.AsyncClient(timeout=_TIMEOUT, transport=self._transport) as client:
                if not self._jwks_uri:
                    discovery = self._settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
                    document = await _get_json(client, discovery)
                    if document.get("issuer") != self._settings.issuer:
                        raise ValueError(f"the discovery document names issuer {document.get('issuer')!r}")
                    uri = document.get("jwks_uri")
                    if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
                        raise ValueError("the discovery document names no jwks_uri")
                    self._jwks_uri = uri
                keys = _parse_jwks(await _get_json(client, self._jwks_uri))
        except (httpx.HTTPError, ValueError) as exc:
            _LOG.warning("identity provider keys not fetched; keeping the keys at hand", error=str(exc))
            return
        self._published = keys
        self._fetched_at = self._clock()
        _LOG.info("identity provider keys fetched", kids=sorted(keys))


async def _get_json(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    async with client.stream("GET", url, headers={"accept": "application/json"}) as response:
        response.raise_for_status()
        body = b""
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > _MAX_DOCUMENT:
                raise ValueError(f"{url} answered more than {_MAX_DOCUMENT} bytes")
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError(f"{url} did not answer a JSON object")
    return document


def _parse_jwks(document: dict[str, Any]) -> dict[str, jwt.PyJWK]:
    """Signing keys by kid; keys we cannot use (encryption keys, unknown types, no kid) are skipped."""
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise ValueError("the JWKS has no keys list")
    keys: dict[str, jwt.PyJWK] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("kid") or entry.get("use", "sig") != "sig":
            continue
        try:
            keys[str(entry["kid"])] = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            continue
    return keys
