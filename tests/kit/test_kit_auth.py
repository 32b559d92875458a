"""User tokens: signature, key id, expiry, audience; alg=none and forgeries refused."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from belfry.auth import Caller, TokenIssuer, TokenVerifier
from belfry.errors import Unauthenticated


def _unsigned(claims: dict[str, object], kid: str) -> str:
    def enc(part: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()

    return f"{enc({'alg': 'none', 'typ': 'JWT', 'kid': kid})}.{enc(claims)}."


def test_round_trip_and_rotation(token_keys: dict[str, bytes]) -> None:
    old = TokenIssuer(token_keys, "k1").issue("acc", "alice")
    new = TokenIssuer(token_keys, "k2").issue("acc", "bob")
    verifier = TokenVerifier(token_keys)
    assert verifier.verify(old)[0] == Caller("acc", "alice")
    assert verifier.verify(new)[0] == Caller("acc", "bob")
    # Retiring k1 invalidates only the tokens it signed.
    retired = TokenVerifier({"k2": token_keys["k2"]})
    assert retired.verify(new)[0].user_id == "bob"
    with pytest.raises(Unauthenticated, match="not signed by a known key"):
        retired.verify(old)


def test_refusals(token_keys: dict[str, bytes]) -> None:
    verifier = TokenVerifier(token_keys)
    now = int(time.time())
    claims = {"iss": "belfry", "aud": "belfry", "acc": "acc", "sub": "alice", "iat": now, "exp": now + 600}
    with pytest.raises(Unauthenticated):
        verifier.verify(_unsigned(claims, "k1"))
    forged = jwt.encode(claims, b"x" * 40, algorithm="HS256", headers={"kid": "k1"})
    with pytest.raises(Unauthenticated, match="invalid"):
        verifier.verify(forged)
    expired = TokenIssuer(token_keys, "k1", ttl_seconds=60).issue("acc", "alice", now=now - 3600)
    with pytest.raises(Unauthenticated, match="expired"):
        verifier.verify(expired)
    with pytest.raises(Unauthenticated, match="malformed"):
        verifier.verify("not-a-token")


def test_metadata(token_keys: dict[str, bytes]) -> None:
    verifier = TokenVerifier(token_keys)
    token = TokenIssuer(token_keys, "k1").issue("acc", "alice")
    assert verifier.from_metadata([("authorization", f"Bearer {token}")]) == Caller("acc", "alice")
    with pytest.raises(Unauthenticated, match="needs a user token"):
        verifier.from_metadata([])
    with pytest.raises(Unauthenticated, match="Bearer"):
        verifier.from_metadata([("authorization", token)])
