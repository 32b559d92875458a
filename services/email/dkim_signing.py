"""DKIM signatures (RFC 6376) with rsa-sha256 and ed25519-sha256 (RFC 8463).

dkimpy canonicalises (``dkim.canonicalization.Relaxed``, its relaxed algorithm, the
code its own signer and verifier run); the private-key operation is
OpenSSL's, through ``cryptography``. dkimpy's ``DKIM.sign`` offers no hook
for the key operation and signs RSA in pure Python (6 ms of CPU for an
RSA-2048 signature, 0.3 ms through OpenSSL), so this module assembles the
``DKIM-Signature`` itself, with the tags dkimpy's signer writes in the same
order: both signature algorithms are deterministic, and
``tests/email/test_email_dkim.py`` checks that a signature made here is
byte for byte the one dkimpy makes for the same message, keys and time,
and that dkimpy's verifier accepts it.

This is the only module that imports ``dkim`` (dkimpy ships no type hints), so
the untyped surface stays this small. Keys are read and checked once, at
start (``load_keys``); ``DkimSigner.sign`` then adds one ``DKIM-Signature``
per configured key to a finished message, canonicalising and hashing the
body and the signed headers once for all of them.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dkim.canonicalization
from belfry.config import Env
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
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
# A header field's name, as dkimpy's parser reads it (RFC 5322 §2.2: printable ASCII up to the first colon).
_FIELD = re.compile(rb"([\x21-\x7e]+?):")
_LINES = re.compile(rb"\r?\n")
_FOLD_AT = 76  # header lines stay under RFC 5322's 78 characters
_FIELD_NAME = b"DKIM-Signature:"
_RELAXED = dkim.canonicalization.Relaxed
_RSA_PADDING = padding.PKCS1v15()
_PREHASHED = utils.Prehashed(hashes.SHA256())

SigningKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def is_domain(name: str) -> bool:
    """A lower-case dotted DNS name."""
    return bool(_LABELS.match(name)) and "." in name


@dataclass(frozen=True)
class DkimKey:
    """One signing key: who it signs for, under which selector, with which algorithm."""

    domain: str
    selector: str
    algorithm: str
    # Checked for its algorithm when loaded (an RSA key of at least 1024 bits, or an Ed25519 key). Never shown.
    private: SigningKey = field(repr=False, compare=False)


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


def _private(path: Path, algorithm: str, where: str) -> SigningKey | str:
    """The key, or why it cannot sign with ``algorithm``."""
    key = _read(path, where)
    if isinstance(key, str):
        return key
    if algorithm == RSA:
        if not isinstance(key, rsa.RSAPrivateKey):
            return f"{where}: {path} holds {_kind(key)}, but {RSA} needs an RSA key"
        if key.key_size < MIN_RSA_BITS:
            return f"{where}: {path} is a {key.key_size}-bit RSA key; RFC 8301 needs at least {MIN_RSA_BITS} (2048 advised)"
        return key
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        return f"{where}: {path} holds {_kind(key)}, but {ED25519} needs an Ed25519 key"
    return key


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
            private: SigningKey | str = ""
        else:
            private = _private(Path(parts[3]), algorithm, where)
            if isinstance(private, str):
                problems.append(private)
        seen.add((domain, selector))
        for problem in problems:
            env.problem(problem)
        if not problems and not isinstance(private, str):
            keys.append(DkimKey(domain, selector, algorithm, private))
    return tuple(keys)


@dataclass(frozen=True)
class _Signing:
    """A key ready to sign: its fixed tags and the private-key operation."""

    domain: str
    tags: bytes  # "v=1; a=...; d=...; i=...; q=dns/txt; s=..." (what precedes t=)
    sign: Callable[[bytes], bytes]  # the SHA-256 digest of the hashed data -> the signature


def _signing(key: DkimKey) -> _Signing:
    private = key.private
    if isinstance(private, rsa.RSAPrivateKey):
        rsa_key = private

        def sign(digest: bytes) -> bytes:
            # RSASSA-PKCS1-v1_5 over SHA-256 (RFC 6376 §3.3.1), by OpenSSL.
            return rsa_key.sign(digest, _RSA_PADDING, _PREHASHED)

    else:
        ed_key = private

        def sign(digest: bytes) -> bytes:
            # RFC 8463 §3: pure Ed25519 over the SHA-256 digest of the hashed data.
            return ed_key.sign(digest)

    tags = f"v=1; a={key.algorithm}; c=relaxed/relaxed; d={key.domain}; i=@{key.domain}; q=dns/txt; s={key.selector}"
    return _Signing(key.domain, tags.encode("ascii"), sign)


def _fields(head: bytes) -> list[list[bytes]]:
    """The header fields as ``[name, value]`` (value with its line ends), as dkimpy's parser gives them."""
    fields: list[list[bytes]] = []
    for line in _LINES.split(head):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1] += line + b"\r\n"
            continue
        match = _FIELD.match(line)
        if match is not None:
            fields.append([match.group(1), line[match.end() :] + b"\r\n"])
    return fields


def _selected(canonical: list[tuple[bytes, bytes]], include: Sequence[bytes]) -> bytes:
    """The signed header fields in ``h=`` order, canonical (RFC 6376 §5.4.2: the last instance first, then up)."""
    out: list[bytes] = []
    last: dict[bytes, int] = {}
    for name in include:
        i = last.get(name, len(canonical))
        while i > 0:
            i -= 1
            if canonical[i][0] == name:
                out.append(name + b":" + canonical[i][1])
                break
        last[name] = i
    return b"".join(out)


def _folded(value: bytes) -> bytes:
    """``value`` folded at spaces into lines under ``_FOLD_AT`` characters after ``DKIM-Signature:``."""
    lines: list[bytes] = []
    line = _FIELD_NAME
    for word in value.split(b" "):
        if len(line) + 1 + len(word) > _FOLD_AT and line.strip():
            lines.append(line)
            line = b""
        line += b" " + word
    lines.append(line)
    return b"\r\n".join(lines)


class DkimSigner:
    """Adds a DKIM-Signature per key (relaxed/relaxed) to finished messages."""

    def __init__(
        self, keys: Sequence[DkimKey], *, envelope_domain: str | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self._keys = tuple(_signing(k) for k in keys)
        self._envelope = (envelope_domain or "").lower()
        self._per_from: dict[str, tuple[_Signing, ...]] = {}
        self._clock = clock

    @property
    def domains(self) -> frozenset[str]:
        """The domains a key signs for."""
        return frozenset(k.domain for k in self._keys)

    def _chosen(self, from_domain: str | None) -> tuple[_Signing, ...]:
        # The From domain's keys and the envelope (bounce) domain's: an account's own From
        # domain is not signed for with the operator's or another account's domain.
        if from_domain is None:
            return self._keys
        wanted = from_domain.lower()
        chosen = self._per_from.get(wanted)
        if chosen is None:
            chosen = tuple(k for k in self._keys if k.domain in (wanted, self._envelope))
            self._per_from[wanted] = chosen
        return chosen

    def sign(self, message: bytes, from_domain: str | None = None) -> bytes:
        """``message`` (CRLF line ends, headers final) with the signatures prepended.

        With ``from_domain``, only the keys of that domain and of the envelope domain sign (none: every key).
        """
        chosen = self._chosen(from_domain)
        if not chosen:
            return message
        head, _, body = message.partition(b"\r\n\r\n")
        present = {m.lower().decode("ascii") for m in _HEADER_NAME.findall(head)}
        include = [name.encode("ascii") for name in (*(h for h in SIGNED if h in present), *OVERSIGNED)]
        # Once for every key: the body hash, and the signed header fields (relaxed, RFC 6376 §3.4.2 and §3.4.4).
        if body.count(b"\n") != body.count(b"\r\n"):
            body = b"\r\n".join(_LINES.split(body))  # bare LFs read as line ends, as dkimpy's parser does
        body_hash = base64.b64encode(hashlib.sha256(_RELAXED.canonicalize_body(body)).digest())
        signed = hashlib.sha256(_selected(_RELAXED.canonicalize_headers(_fields(head)), include))
        common = b"; t=%d; h=%s; bh=%s; b=" % (int(self._clock()), b" : ".join(include), body_hash)
        signatures = []
        for key in chosen:
            unsigned = _folded(key.tags + common)
            # The signature's own field is hashed last, with an empty b= and without its line end (§3.7).
            [(name, value)] = _RELAXED.canonicalize_headers([[_FIELD_NAME[:-1], unsigned[len(_FIELD_NAME) :]]])
            digest = signed.copy()
            digest.update(name + b":" + value.rstrip())
            signature = base64.b64encode(key.sign(digest.digest()))
            lines = [signature[i : i + _FOLD_AT - 4] for i in range(0, len(signature), _FOLD_AT - 4)]
            signatures.append(unsigned + b"\r\n " + b"\r\n ".join(lines) + b"\r\n")
        return b"".join(signatures) + message
