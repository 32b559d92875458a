"""DKIM signatures (RFC 6376) with rsa-sha256 and ed25519-sha256 (RFC 8463), made by dkimpy.

This is the only module that imports ``dkim`` (dkimpy ships no type hints), so
the untyped surface stays this small. Keys are read and checked once, at
start (``load_keys``); ``DkimSigner.sign`` then adds one ``DKIM-Signature``
per configured key to a finished message, parsing the message once for all
of them.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dkim
from belfry.config import Env
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

VARIABLE = "BELFRY_EMAIL_DKIM_KEYS"
RSA = "rsa-sha256"
ED25519 = "ed25519-sha256"
ALGORITHMS = (RSA, ED25519)
# RFC 8301 §3.2: signers MUST NOT use RSA keys under 1024 bits (verifiers ignore them).
MIN_RSA_BITS = 1024
# Every header a reader or a filter acts on, in the order they are hashed; only those present are signed.
SIGNED = (
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "auto-submitted",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "feedback-id",
)
# Named once more than they occur (RFC 6376 §8.15): a second From, Subject or
# unsubscribe link added in transit breaks the signature instead of being
# shown to the reader under our domain's name. Sender is left out on purpose:
# some submission relays add one.
OVERSIGNED = ("from", "reply-to", "to", "cc", "subject", "date", "list-unsubscribe", "list-unsubscribe-post")
_LABELS = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")
_HEADER_NAME = re.compile(rb"^([!-9;-~]+):", re.MULTILINE)


def is_domain(name: str) -> bool:
    """A lower-case dotted DNS name."""
    return bool(_LABELS.match(name)) and "." in name


@dataclass(frozen=True)
class DkimKey:
    """One signing key: who it signs for, under which selector, with which algorithm."""

    domain: str
    selector: str
    algorithm: str
    # In the form dkimpy takes: PKCS#1 PEM for RSA, the base64 32-byte seed for Ed25519. Never shown.
    private: bytes = field(repr=False)


def _read(path: Path, where: str) -> PrivateKeyTypes | str:
    """The key in ``path``, or why it cannot be read (the key itself never appears in the message)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"{where}: cannot read {path}: {exc.strerror or exc}"
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        return f"{where}: {path} holds an encrypted key; DKIM keys are read without a passphrase"
    except (ValueError, UnsupportedAlgorithm):
        return f"{where}: {path} does not hold a PEM private key"


def _private(path: Path, algorithm: str, where: str) -> bytes | str:
    """The key in dkimpy's form, or why it cannot sign with ``algorithm``."""
    key = _read(path, where)
    if isinstance(key, str):
        return key
    if algorithm == RSA:
        if not isinstance(key, rsa.RSAPrivateKey):
            return f"{where}: {path} holds {_kind(key)}, but {RSA} needs an RSA key"
        if key.key_size < MIN_RSA_BITS:
            return f"{where}: {path} is a {key.key_size}-bit RSA key; RFC 8301 needs at least {MIN_RSA_BITS} (2048 advised)"
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        return f"{where}: {path} holds {_kind(key)}, but {ED25519} needs an Ed25519 key"
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return base64.b64encode(seed)


def _kind(key: object) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "an RSA key"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "an Ed25519 key"
    return f"a {type(key).__name__.removeprefix('_').removesuffix('PrivateKey') or 'different'} key"


def load_keys(env: Env, domains: Collection[str]) -> tuple[DkimKey, ...]:
    """``BELFRY_EMAIL_DKIM_KEYS``: ``domain:selector:algorithm:/path/key.pem`` entries separated by ``;``.

    ``domains`` are the ones mail is sent under (the From address's and the
    envelope sender's): a key for any other domain would never sign anything
    that aligns, so it is reported rather than silently unused. Every problem
    goes to ``env``, so one start names them all.
    """
    keys: list[DkimKey] = []
    seen: set[tuple[str, str]] = set()
    entries = [e.strip() for e in env.str(VARIABLE, "").split(";") if e.strip()]
    for number, entry in enumerate(entries, start=1):
        parts = [p.strip() for p in entry.split(":", 3)]
        where = f"{VARIABLE} entry {number}"
        if len(parts) != 4 or not all(parts):
            env.problem(f"{where} must be domain:selector:algorithm:/path/to/key.pem, got {entry!r}")
            continue
        domain, selector, algorithm = (p.lower() for p in parts[:3])
        problems = []
        if not _LABELS.match(domain) or "." not in domain:
            problems.append(f"{where}: {domain!r} is not a domain name")
        elif domain not in domains:
            problems.append(
                f"{where}: {domain!r} is not a domain this sender uses ({', '.join(sorted(domains))}): "
                "DMARC only counts a signature of the From or envelope domain"
            )
        if not _LABELS.match(selector):
            problems.append(f"{where}: {selector!r} is not a selector (DNS labels such as 2026a or mail.2026)")
        elif (domain, selector) in seen:
            problems.append(
                f"{where}: selector {selector!r} of {domain!r} is listed twice (DNS publishes one key per selector)"
            )
        if algorithm not in ALGORITHMS:
            problems.append(f"{where}: unknown algorithm {algorithm!r}; use {RSA} or {ED25519}")
            private: bytes | str = ""
        else:
            private = _private(Path(parts[3]), algorithm, where)
            if isinstance(private, str):
                problems.append(private)
        seen.add((domain, selector))
        for problem in problems:
            env.problem(problem)
        if not problems and isinstance(private, bytes):
            keys.append(DkimKey(domain, selector, algorithm, private))
    return tuple(keys)


class DkimSigner:
    """Adds a DKIM-Signature per key (relaxed/relaxed) to finished messages."""

    def __init__(self, keys: Sequence[DkimKey], *, envelope_domain: str | None = None) -> None:
        # Bytes once, here: dkimpy takes bytes, and the keys do not change while the service runs.
        self._keys = tuple(
            (k.selector.encode("ascii"), k.domain.encode("ascii"), k.private, k.algorithm.encode("ascii")) for k in keys
        )
        self._envelope = (envelope_domain or "").lower()
        self._per_from: dict[str, tuple[tuple[bytes, bytes, bytes, bytes], ...]] = {}

    @property
    def domains(self) -> frozenset[str]:
        """The domains a key signs for."""
        return frozenset(k[1].decode("ascii") for k in self._keys)

    def _chosen(self, from_domain: str | None) -> tuple[tuple[bytes, bytes, bytes, bytes], ...]:
        # The From domain's keys and the envelope (bounce) domain's: an account's own From
        # domain is not signed for with the operator's or another account's domain.
        if from_domain is None:
            return self._keys
        wanted = from_domain.lower()
        chosen = self._per_from.get(wanted)
        if chosen is None:
            chosen = tuple(k for k in self._keys if k[1].decode("ascii") in (wanted, self._envelope))
            self._per_from[wanted] = chosen
        return chosen

    def sign(self, message: bytes, from_domain: str | None = None) -> bytes:
        """``message`` (CRLF line ends, headers final) with the signatures prepended.

        With ``from_domain``, only the keys of that domain and of the envelope domain sign (none: every key).
        """
        head = message.split(b"\r\n\r\n", 1)[0]
        present = {m.lower().decode("ascii") for m in _HEADER_NAME.findall(head)}
        include = [name.encode("ascii") for name in (*(h for h in SIGNED if h in present), *OVERSIGNED)]
        parsed = dkim.DKIM(message)
        signatures = [
            bytes(
                parsed.sign(
                    selector,
                    domain,
                    private,
                    signature_algorithm=algorithm,
                    canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=include,
                )
            )
            for selector, domain, private, algorithm in self._chosen(from_domain)
        ]
        return b"".join(signatures) + message
