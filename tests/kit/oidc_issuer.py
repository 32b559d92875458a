"""A real OpenID Connect issuer on loopback: discovery document, JWKS, and tokens signed by its keys.

It serves ``/.well-known/openid-configuration`` and ``/jwks`` over HTTP on
port 0 (aiohttp), publishes the public halves of the keys it holds, and
counts the requests it answered so tests can see when a verifier fetched.
``rotate`` replaces every key by a new one, as a provider's rotation does.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
_SERIAL = itertools.count(1)


def _new_key(alg: str) -> PrivateKey:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(65537, 2048)


def _jwk(alg: str, kid: str, key: PrivateKey) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        data: dict[str, Any] = ECAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ed25519.Ed25519PublicKey):
        data = OKPAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = RSAAlgorithm.to_jwk(public, as_dict=True)
    return {**data, "kid": kid, "alg": alg, "use": "sig"}


@dataclass
class Issuer:
    """The issuer's state; ``url`` is known once it serves."""

    audience: str = "belfry-test"
    url: str = ""
    keys: dict[str, tuple[str, PrivateKey]] = field(default_factory=dict)  # kid -> (alg, key)
    jwks_requests: int = 0
    discovery_requests: int = 0
    fetched: asyncio.Event = field(default_factory=asyncio.Event)  # set on every JWKS answer

    def add_key(self, alg: str = "ES256") -> str:
        """A new key, published from now on; its kid."""
        kid = f"{alg.lower()}-{next(_SERIAL)}"
        self.keys[kid] = (alg, _new_key(alg))
        return kid

    def rotate(self, alg: str = "ES256") -> str:
        """Every key retired, one new key published; its kid."""
        self.keys.clear()
        return self.add_key(alg)

    def token(
        self,
        kid: str,
        *,
        account: str = "acc_1",
        user: str = "alice",
        lifetime: int = 600,
        issued: float | None = None,
        **claims: Any,
    ) -> str:
        """A token signed with ``kid``'s key; ``claims`` override the defaults."""
        alg, key = self.keys[kid]
        now = int(time.time() if issued is None else issued)
        body = {
            "iss": self.url,
            "aud": self.audience,
            "sub": user,
            "acc": account,
            "iat": now,
            "exp": now + lifetime,
            **claims,
        }
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})

    def sign_with(self, key: PrivateKey, alg: str, kid: str, **claims: Any) -> str:
        """A token signed by a key this issuer does not publish (a forger's)."""
        now = int(time.time())
        body = {"iss": self.url, "aud": self.audience, "sub": "alice", "acc": "acc_1", "iat": now, "exp": now + 600}
        return jwt.encode({**body, **claims}, key, algorithm=alg, headers={"kid": kid})

    async def _discovery(self, _: web.Request) -> web.Response:
        self.discovery_requests += 1
        document = {"issuer": self.url, "jwks_uri": f"{self.url}/jwks", "id_token_signing_alg_values_supported": []}
        return web.Response(text=json.dumps(document), content_type="application/json")

    async def _jwks(self, _: web.Request) -> web.Response:
        self.jwks_requests += 1
        body = {"keys": [_jwk(alg, kid, key) for kid, (alg, key) in self.keys.items()]}
        self.fetched.set()
        return web.Response(text=json.dumps(body), content_type="application/json")


@asynccontextmanager
async def serve(audience: str = "belfry-test") -> AsyncIterator[Issuer]:
    """An issuer serving on 127.0.0.1, with one ES256 key to begin with."""
    issuer = Issuer(audience=audience)
    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", issuer._discovery)
    app.router.add_get("/jwks", issuer._jwks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    issuer.url = f"http://127.0.0.1:{port}"
    issuer.add_key("ES256")
    try:
        yield issuer
    finally:
        await runner.cleanup()
