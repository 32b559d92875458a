"""User tokens from an identity provider: a real local issuer (discovery + JWKS over HTTP) that rotates its keys.

Each test gets its own issuer and verifier; the clock that bounds how often
unknown kids fetch the keys is injected, so nothing here waits on time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from belfry.auth import Caller
from belfry.errors import Unauthenticated
from belfry.oidc import OidcVerifier
from belfry.trust import OidcSettings
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.kit import oidc_issuer
from tests.kit.oidc_issuer import Issuer

TEN_YEARS = 10 * 365 * 86_400


def _hs256(claims: dict[str, object], secret: bytes, kid: str) -> str:
    """An HS256 token made by hand (PyJWT refuses to use a public key as an HMAC secret)."""

    def part(data: dict[str, object]) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=")

    signing_input = part({"alg": "HS256", "typ": "JWT", "kid": kid}) + b"." + part(claims)
    mac = base64.urlsafe_b64encode(hmac.new(secret, signing_input, hashlib.sha256).digest()).rstrip(b"=")
    return (signing_input + b"." + mac).decode()


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    async with oidc_issuer.serve() as running:
        yield running


def _verifier(issuer: Issuer, clock: Clock | None = None, **settings: object) -> OidcVerifier:
    oidc = OidcSettings(issuer=issuer.url, audience=issuer.audience, refresh_seconds=30.0, **settings)  # type: ignore[arg-type]
    return OidcVerifier(oidc, leeway_seconds=30, max_lifetime_seconds=86_400, clock=clock or Clock())


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "RS256"])
async def test_tokens_signed_with_each_algorithm_verify(issuer: Issuer, alg: str) -> None:
    kid = issuer.add_key(alg)
    caller, expires = await _verifier(issuer).authenticate(issuer.token(kid, account="acc_9", user="bob"))
    assert caller == Caller("acc_9", "bob")
    assert expires > time.time()
    assert issuer.discovery_requests == 1 and issuer.jwks_requests == 1


async def test_a_rotated_key_is_fetched_on_its_first_token_and_the_retired_one_stops_working(issuer: Issuer) -> None:
    verifier = _verifier(issuer)
    (first,) = issuer.keys
    old_token = issuer.token(first)
    assert (await verifier.authenticate(old_token))[0].user_id == "alice"
    second = issuer.rotate("EdDSA")
    # Known keys verify without asking the issuer again.
    assert (await verifier.authenticate(old_token))[0].user_id == "alice"
    assert issuer.jwks_requests == 1
    # The first token of the new key makes the verifier fetch, and passes.
    assert (await verifier.authenticate(issuer.token(second, user="carol")))[0].user_id == "carol"
    assert issuer.jwks_requests == 2
    # The retired key is no longer published, so its tokens are refused now.
    with pytest.raises(Unauthenticated, match="does not publish"):
        await verifier.authenticate(old_token)


async def test_unknown_kids_fetch_the_keys_at_most_once_per_refresh_interval(issuer: Issuer) -> None:
    clock = Clock()
    verifier = _verifier(issuer, clock)
    (kid,) = issuer.keys
    await verifier.authenticate(issuer.token(kid))
    forger = ec.generate_private_key(ec.SECP256R1())
    made_up = [issuer.sign_with(forger, "ES256", f"made-up-{i}") for i in range(50)]
    for token in made_up:
        with pytest.raises(Unauthenticated, match="does not publish"):
            await verifier.authenticate(token)
    assert issuer.jwks_requests == 2  # the first made-up kid fetched once; the other 49 did not
    clock.now += 30.0
    with pytest.raises(Unauthenticated):
        await verifier.authenticate(made_up[0])
    assert issuer.jwks_requests == 3


async def test_a_call_site_that_cannot_await_starts_the_fetch_and_passes_once_it_is_done(issuer: Issuer) -> None:
    verifier = _verifier(issuer)
    (kid,) = issuer.keys
    await verifier.authenticate(issuer.token(kid))
    fresh = issuer.rotate()
    token = issuer.token(fresh)
    issuer.fetched.clear()
    with pytest.raises(Unauthenticated, match="does not publish"):
        verifier.verify(token)  # synchronous: refused now, the keys are fetched in the background
    await issuer.fetched.wait()
    await verifier.prepare(token)  # joins the fetch in flight (no second request)
    assert verifier.verify(token)[0].user_id == "alice"
    assert issuer.jwks_requests == 2


async def test_a_ten_year_token_is_refused_however_well_signed(issuer: Issuer) -> None:
    (kid,) = issuer.keys
    with pytest.raises(Unauthenticated, match="lives longer than"):
        await _verifier(issuer).authenticate(issuer.token(kid, lifetime=TEN_YEARS))


async def test_tokens_for_another_issuer_or_audience_are_refused(issuer: Issuer) -> None:
    verifier = _verifier(issuer)
    (kid,) = issuer.keys
    with pytest.raises(Unauthenticated, match="audience"):
        await verifier.authenticate(issuer.token(kid, aud="another-app"))
    with pytest.raises(Unauthenticated, match="issuer"):
        await verifier.authenticate(issuer.token(kid, iss="https://idp.elsewhere.example"))
    # A token from another (real) issuer: its key is not ours.
    async with oidc_issuer.serve() as other:
        (foreign,) = other.keys
        other.audience = issuer.audience
        with pytest.raises(Unauthenticated, match="does not publish"):
            await verifier.authenticate(other.token(foreign))


async def test_forged_and_confused_tokens_are_refused(issuer: Issuer) -> None:
    verifier = _verifier(issuer)
    (kid,) = issuer.keys
    await verifier.authenticate(issuer.token(kid))
    forger = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(Unauthenticated, match="invalid"):
        verifier.verify(issuer.sign_with(forger, "ES256", kid))  # the right kid, another key
    # HS256 with the published public key as the "secret": the classic algorithm confusion.
    public_pem = (
        issuer.keys[kid][1]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    now = int(time.time())
    claims = {"iss": issuer.url, "aud": issuer.audience, "sub": "alice", "acc": "acc_1", "iat": now, "exp": now + 60}
    with pytest.raises(Unauthenticated, match="not accepted"):
        verifier.verify(_hs256(claims, public_pem, kid))
    unsigned = jwt.encode(claims, "", algorithm="none", headers={"kid": kid})
    with pytest.raises(Unauthenticated, match="not accepted"):
        verifier.verify(unsigned)


async def test_configured_claim_names_carry_account_and_user(issuer: Issuer) -> None:
    verifier = _verifier(issuer, account_claim="https://crm.example/account", user_claim="uid")
    (kid,) = issuer.keys
    names: dict[str, Any] = {"https://crm.example/account": "acc_7", "uid": "u-42"}
    token = issuer.token(kid, **names)
    assert (await verifier.authenticate(token))[0] == Caller("acc_7", "u-42")
    with pytest.raises(Unauthenticated, match="does not name an account"):
        await verifier.authenticate(issuer.token(kid))  # "acc" and "sub" are not the configured names


async def test_expiry_and_issue_time_allow_only_the_configured_skew(issuer: Issuer) -> None:
    verifier = _verifier(issuer)
    (kid,) = issuer.keys
    now = time.time()
    # Expired 10 s ago: within the 30 s leeway.
    assert await verifier.authenticate(issuer.token(kid, issued=now - 610))
    with pytest.raises(Unauthenticated, match="expired"):
        await verifier.authenticate(issuer.token(kid, issued=now - 700))
    with pytest.raises(Unauthenticated, match="future"):
        await verifier.authenticate(issuer.token(kid, issued=now + 3600))
