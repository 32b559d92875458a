"""Who is calling, service to service: the mTLS client certificate, or a service token.

A caller's identity is a plain name: a Belfry service (``dispatcher``), or an
identity the deployment configures (a producer such as ``crm``, the
``provisioning`` sync, an operator). ``belfry.access`` decides what each one
may call.

* **Mutual TLS** (Kubernetes): the name is taken from the verified client
  certificate — its SPIFFE-style URI SAN ``spiffe://<trust domain>/<name>``,
  else the first label of its first DNS SAN (``dispatcher.belfry.svc`` →
  ``dispatcher``). The TLS layer has already checked the chain to the mesh CA.
* **Service tokens** where TLS is off (``belfry up``, the dev overlay): a JWT
  signed with Ed25519 (``EdDSA``) naming the identity in ``sub``, presented in
  the ``belfry-service-token`` metadata. Peers hold only the *public* keys, so
  no process can mint another's token; ``belfry up`` (or the operator, with
  ``belfry service-tokens``) keeps the private key and mints one per process.
  Keys carry a ``kid`` so a new one can be added before the old one goes.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from belfry.errors import ConfigError, Unauthenticated

METADATA_KEY = "belfry-service-token"
DEFAULT_TRUST_DOMAIN = "belfry"
_ISSUER = "belfry-mesh"
_AUDIENCE = "belfry-mesh"
_ALGORITHM = "EdDSA"
# Verified tokens and parsed certificates are remembered (bounded): a hot caller
# presents the same bytes on every call, and Ed25519 + JSON parsing is tens of µs.
_CACHE_LIMIT = 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def valid_name(name: str) -> bool:
    """An identity is a short lowercase name: letters, digits, ``-``, ``_`` and ``.``."""
    return 0 < len(name) <= 128 and all(c.isascii() and (c.isalnum() or c in "-_.") for c in name) and name.islower()


@dataclass(frozen=True)
class SigningKey:
    """The private key that mints service tokens; kept by ``belfry up`` or the operator, never by a service."""

    kid: str
    key: ed25519.Ed25519PrivateKey

    @classmethod
    def generate(cls, kid: str) -> SigningKey:
        """A fresh Ed25519 key."""
        return cls(kid, ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def parse(cls, text: str) -> SigningKey:
        """``kid=<base64url of the 32-byte private key>``."""
        kid, sep, raw = text.strip().partition("=")
        try:
            if not sep or not kid:
                raise ValueError("not kid=key")
            return cls(kid, ed25519.Ed25519PrivateKey.from_private_bytes(_unb64(raw)))
        except ValueError as exc:
            raise ConfigError("a service-token signing key must be kid=<base64url Ed25519 private key>") from exc

    def dump(self) -> str:
        """The form ``parse`` reads."""
        raw = self.key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return f"{self.kid}={_b64(raw)}"

    def public(self) -> str:
        """``kid=<base64url public key>``: one entry of ``BELFRY_SERVICE_TOKEN_KEYS``."""
        raw = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"{self.kid}={_b64(raw)}"

    def mint(self, identity: str, *, ttl_seconds: int, now: float | None = None) -> str:
        """A service token naming ``identity``, valid for ``ttl_seconds``."""
        if not valid_name(identity):
            raise ConfigError(f"{identity!r} is not a valid identity name (lowercase letters, digits, - _ .)")
        issued = int(time.time() if now is None else now)
        claims = {"iss": _ISSUER, "aud": _AUDIENCE, "sub": identity, "iat": issued, "exp": issued + ttl_seconds}
        return jwt.encode(claims, self.key, algorithm=_ALGORITHM, headers={"kid": self.kid})


def parse_public_keys(raw: str) -> dict[str, ed25519.Ed25519PublicKey]:
    """``kid1=<base64url key>,kid2=...`` → {kid: key} (several during a rotation)."""
    keys: dict[str, ed25519.Ed25519PublicKey] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        kid, sep, text = part.partition("=")
        try:
            if not sep or not kid:
                raise ValueError("not kid=key")
            keys[kid] = ed25519.Ed25519PublicKey.from_public_bytes(_unb64(text))
        except ValueError as exc:
            raise ConfigError(
                "BELFRY_SERVICE_TOKEN_KEYS entries must be kid=<base64url Ed25519 public key>, comma-separated"
            ) from exc
    return keys


class ServiceTokenVerifier:
    """Checks a service token: our algorithm, a known key, issuer, audience, expiry."""

    def __init__(self, keys: dict[str, ed25519.Ed25519PublicKey], *, leeway_seconds: int = 30) -> None:
        self._keys = dict(keys)
        self._leeway = leeway_seconds
        self._seen: dict[str, tuple[str, int]] = {}  # token -> (identity, exp)

    def identity(self, token: str, *, now: float | None = None) -> str:
        """The identity a valid token names; Unauthenticated on any flaw."""
        moment = time.time() if now is None else now
        seen = self._seen.get(token)
        if seen is not None and moment < seen[1] + self._leeway:
            return seen[0]
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated("the service token is malformed") from exc
        key = self._keys.get(str(header.get("kid", "")))
        # The algorithm is ours, never the header's: "none" and HMAC-confusion tokens fail here.
        if key is None or header.get("alg") != _ALGORITHM:
            raise Unauthenticated("the service token was not signed by a known mesh key")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[_ALGORITHM],
                audience=_AUDIENCE,
                issuer=_ISSUER,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "sub", "aud", "iss"]},
            )
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"the service token is invalid: {exc}") from exc
        name = claims["sub"]
        if not isinstance(name, str) or not valid_name(name):
            raise Unauthenticated("the service token does not name a valid identity")
        if len(self._seen) >= _CACHE_LIMIT:
            self._seen.clear()
        self._seen[token] = (name, int(claims["exp"]))
        return name


class CertificateNames:
    """The identity a verified client certificate carries (remembered per certificate)."""

    def __init__(self, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> None:
        self._prefix = f"spiffe://{trust_domain}/"
        self._seen: dict[bytes, str | None] = {}

    def identity(self, pem: bytes) -> str | None:
        """``spiffe://<trust domain>/<name>`` → name; else, with no SPIFFE ID at all, the first DNS SAN's first label."""
        if pem in self._seen:
            return self._seen[pem]
        name = self._parse(pem)
        if len(self._seen) >= _CACHE_LIMIT:
            self._seen.clear()
        self._seen[pem] = name
        return name

    def _parse(self, pem: bytes) -> str | None:
        try:
            cert = x509.load_pem_x509_certificate(pem)
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, x509.ExtensionNotFound):
            return None
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        spiffe = {u.removeprefix(self._prefix) for u in uris if u.startswith(self._prefix)}
        if spiffe:
            # Two different names in one certificate would make the caller ambiguous: none is trusted.
            (name,) = spiffe if len(spiffe) == 1 else (None,)
            return name if name is not None and valid_name(name) else None
        if any(u.startswith("spiffe://") for u in uris):
            # Another trust domain's certificate: its DNS names must not make it one of ours.
            return None
        dns = sans.get_values_for_type(x509.DNSName)
        label = dns[0].split(".", 1)[0].lower() if dns else ""
        return label if valid_name(label) else None


# A fixed token, or one chosen per method (test clients standing in for several callers).
Token = str | Callable[[str], str]


def _with_token(details: grpc.aio.ClientCallDetails, token: Token) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    if not isinstance(token, str):
        method = details.method
        token = token(method.decode() if isinstance(method, bytes) else method)
    metadata.add(METADATA_KEY, token)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _Token:
    def __init__(self, token: Token) -> None:
        self._token = token


# grpc.aio sorts a channel's interceptors by their first matching kind: one class per kind.
class _PresentUnaryUnary(_Token, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]  # no grpc stubs
    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        """Unary call, token added."""
        return await continuation(_with_token(details, self._token), request)


class _PresentUnaryStream(_Token, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]  # no grpc stubs
    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        """Server-streaming call, token added."""
        return await continuation(_with_token(details, self._token), request)


class _PresentStreamUnary(_Token, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]  # no grpc stubs
    async def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        """Client-streaming call, token added."""
        return await continuation(_with_token(details, self._token), requests)


class _PresentStreamStream(_Token, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]  # no grpc stubs
    async def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        """Bidirectional call, token added."""
        return await continuation(_with_token(details, self._token), requests)


def presenting(token: Token) -> list[Any]:
    """Client interceptors that present ``token`` on every call of a channel (where TLS is off)."""
    kinds = (_PresentUnaryUnary, _PresentUnaryStream, _PresentStreamUnary, _PresentStreamStream)
    return [kind(token) for kind in kinds]
