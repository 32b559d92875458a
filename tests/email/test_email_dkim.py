"""DKIM (issue "Deliverability", 3): every message the real sender hands to a real SMTP server is signed
with each configured key (RSA and Ed25519 side by side), and dkimpy's own verifier, given the public keys
through a stub resolver in place of DNS, accepts the signatures and rejects an altered body or Subject.

The signer is ours (OpenSSL through ``cryptography`` for the key operation, dkimpy's canonicalisation);
both algorithms are deterministic, so each signature is also compared, tag for tag and byte for byte, with
the one dkimpy's own ``DKIM.sign`` makes for the same message, key and time."""

from __future__ import annotations

import base64
from pathlib import Path
from unittest import mock

import asyncpg
import dkim
import pytest
from belfry import service
from belfry.errors import ConfigError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.util import parse_tag_value

from services.email.compose import feedback_id
from services.email.dkim_signing import OVERSIGNED, SIGNED, DkimKey, DkimSigner
from services.email.server import build_for
from services.email.settings import load_settings
from tests.email.email_helpers import Capture, email_env, enqueue_messages, message, wait_until_finished

# Two primes of 384 bits (openssl prime -generate): a 768-bit RSA key, too short for RFC 8301.
_P = (
    37533331124237030392838363947416490562783150009073903709949938855889376242491371540632731295490137187014038812107077
)
_Q = (
    34056686724960214126178155472727659543265256782832144388107698631496121760214911573949693614278981139593813770566927
)
VERP_KEY = "verp-key-for-tests-only-dkim-0123456789"


def _pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    # PKCS#8, what `openssl genpkey` writes for both kinds.
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _txt(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    """The DNS TXT record an operator publishes for ``key`` (RFC 6376 §3.6.1, RFC 8463 §4)."""
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)


class Zone:
    """A stub resolver for dkimpy's ``dnsfunc``: the TXT records published, and the names asked for."""

    def __init__(self) -> None:
        self.records: dict[bytes, bytes] = {}
        self.asked: list[bytes] = []

    def publish(self, selector: str, domain: str, key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> None:
        self.records[f"{selector}._domainkey.{domain}.".encode()] = _txt(key)

    def __call__(self, name: bytes, timeout: int = 5) -> bytes | None:
        self.asked.append(name)
        return self.records.get(name)


def _signatures(raw: bytes) -> list[dict[bytes, bytes]]:
    parsed = dkim.DKIM(raw)
    return [parse_tag_value(value) for name, value in parsed.headers if name.lower() == b"dkim-signature"]


def _verified(raw: bytes, zone: Zone) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature of ``raw``, top to bottom (as ``dkim.verify`` gives it for the first)."""
    verdicts = []
    for i in range(len(_signatures(raw))):
        try:
            verdicts.append(bool(dkim.DKIM(raw).verify(idx=i, dnsfunc=zone)))
        except dkim.DKIMException:  # what dkim.verify() reports as False: a body hash mismatch raises
            verdicts.append(False)
    return verdicts


def _dkimpy_signature(
    unsigned: bytes, key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey, selector: bytes, domain: bytes, at: int
) -> dict[bytes, bytes]:
    """The tags of the signature dkimpy's own signer makes for ``unsigned`` at time ``at`` (whitespace removed)."""
    head = unsigned.split(b"\r\n\r\n", 1)[0].lower()
    present = [h.encode() for h in SIGNED if f"\n{h}:".encode() in b"\n" + head]
    include = [*present, *(h.encode() for h in OVERSIGNED)]
    if isinstance(key, rsa.RSAPrivateKey):
        algorithm = b"rsa-sha256"
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    else:
        algorithm = b"ed25519-sha256"
        private = base64.b64encode(
            key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        )
    with mock.patch.object(dkim.time, "time", return_value=float(at)):  # dkimpy writes t= from time.time()
        header = dkim.DKIM(unsigned).sign(
            selector,
            domain,
            private,
            signature_algorithm=algorithm,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=include,
        )
    return _tags(parse_tag_value(header.split(b":", 1)[1]))


def _tags(tags: dict[bytes, bytes]) -> dict[bytes, bytes]:
    return {name: b"".join(value.split()) for name, value in tags.items()}


def _unsigned(raw: bytes) -> bytes:
    """``raw`` without its leading DKIM-Signature fields (the message as it was before signing)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    kept = [f for f in head.replace(b"\r\n ", b"\x00").split(b"\r\n") if not f.startswith(b"DKIM-Signature:")]
    return b"\r\n".join(kept).replace(b"\x00", b"\r\n ") + b"\r\n\r\n" + body


def _altered_body(raw: bytes) -> bytes:
    # One character of the text part's base64 changed: content, not whitespace relaxed canonicalisation ignores.
    marker = b"Content-Transfer-Encoding: base64\r\n\r\n"
    at = raw.index(marker) + len(marker)
    return raw[:at] + (b"B" if raw[at : at + 1] == b"A" else b"A") + raw[at + 1 :]


@pytest.fixture(scope="module")
def keys(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Path, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey]]:
    """Key files an operator would have: RSA-2048 and Ed25519 for the From domain, Ed25519 for the bounce domain."""
    folder = tmp_path_factory.mktemp("dkim")
    made: dict[str, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey] = {
        "rsa": rsa.generate_private_key(65537, 2048),
        "ed": ed25519.Ed25519PrivateKey.generate(),
        "bounce": ed25519.Ed25519PrivateKey.generate(),
    }
    found = {}
    for name, key in made.items():
        path = folder / f"{name}.pem"
        path.write_bytes(_pem(key))
        found[name] = (path, key)
    return found


async def _send(env: dict[str, str], pool: asyncpg.Pool, capture: Capture, account_id: str, count: int) -> list[bytes]:
    """Run the real service until ``count`` messages (one locked topic among them) are sent; their raw bytes."""
    settings = load_settings(env)
    running = await service.start("email", settings.common, build_for(settings))
    users = [f"dkim{i}" for i in range(count)]
    msgs = [message(account_id, user_id=u, recipient_email=f"{u}@example.test") for u in users[1:]]
    msgs.append(
        message(
            account_id,
            user_id=users[0],
            recipient_email=f"{users[0]}@example.test",
            topic="account.billing",
            locked=True,
        )
    )
    try:
        await enqueue_messages(pool, msgs)
        done = await wait_until_finished(pool, account_id, count)
    finally:
        await running.stop(0.1)
    assert [d["state"] for d in done] == ["sent"] * count
    wanted = {m.recipient_email for m in msgs}
    caught = [c.raw for c in capture.snapshot() if c.rcpt_tos[0] in wanted]
    assert len(caught) == count
    return caught


async def test_rsa_and_ed25519_signatures_verify_and_break_when_altered(
    database_url: str,
    token_keys: dict[str, bytes],
    pool: asyncpg.Pool,
    smtp: tuple[Capture, int],
    account_id: str,
    keys: dict[str, tuple[Path, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey]],
) -> None:
    capture, port = smtp
    (rsa_path, rsa_key), (ed_path, ed_key) = keys["rsa"], keys["ed"]
    config = f"belfry.test:rsa2026:rsa-sha256:{rsa_path}; Belfry.Test:ed2026:ED25519-SHA256:{ed_path}"
    env = email_env(database_url, token_keys, port, BELFRY_EMAIL_DKIM_KEYS=config)
    zone = Zone()
    zone.publish("rsa2026", "belfry.test", rsa_key)
    zone.publish("ed2026", "belfry.test", ed_key)

    for raw in await _send(env, pool, capture, account_id, 2):
        signatures = _signatures(raw)
        assert sorted((s[b"a"], s[b"s"], s[b"d"]) for s in signatures) == [
            (b"ed25519-sha256", b"ed2026", b"belfry.test"),
            (b"rsa-sha256", b"rsa2026", b"belfry.test"),
        ]
        for s in signatures:
            assert s[b"c"] == b"relaxed/relaxed"
            signed = [h.strip() for h in s[b"h"].split(b":")]
            assert signed.count(b"from") == 2  # oversigned: a From added in transit breaks it
            assert {b"to", b"subject", b"date", b"message-id", b"mime-version", b"content-type"} <= set(signed)
            assert {b"auto-submitted", b"feedback-id"} <= set(signed)
            # Present: signed and oversigned; absent (the locked topic): oversigned, so none can be added.
            assert signed.count(b"list-unsubscribe") == (2 if b"\r\nList-Unsubscribe: " in raw else 1)
        # Byte for byte dkimpy's own signature of the message as it was before signing.
        unsigned = _unsigned(raw)
        assert b"DKIM-Signature" not in unsigned and unsigned in raw
        for s in signatures:
            key = rsa_key if s[b"a"] == b"rsa-sha256" else ed_key
            theirs = _dkimpy_signature(unsigned, key, s[b"s"], s[b"d"], int(s[b"t"]))
            assert _tags(s) == theirs
        zone.asked.clear()
        assert _verified(raw, zone) == [True, True]
        assert sorted(zone.asked) == [b"ed2026._domainkey.belfry.test.", b"rsa2026._domainkey.belfry.test."]

        assert _verified(_altered_body(raw), zone) == [False, False]
        subject = next(line for line in raw.split(b"\r\n") if line.startswith(b"Subject: "))
        assert _verified(raw.replace(subject, subject + b" (edited)", 1), zone) == [False, False]
        # A second From added after signing (shown by some clients) breaks it too.
        assert _verified(raw.replace(b"\r\nFrom: ", b"\r\nFrom: Mallory <m@evil.test>\r\nFrom: ", 1), zone) == [
            False,
            False,
        ]


_MESSAGES = {
    "folded and repeated headers, spaces to relax": (
        b"From: Ana <ana@belfry.test>\r\nTo: a@example.test\r\nTo:  b@example.test \r\n"
        b"Subject:   Quote\t Q-12\r\n\tfolded   here\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\n"
        b"X-Unsigned: kept out of h=\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"\r\nline with trailing spaces   \r\n\tindented\r\n\r\n\r\n"
    ),
    "empty body": b"From: ana@belfry.test\r\nSubject: nothing\r\n\r\n",
    "bare LF line ends in the body": b"From: ana@belfry.test\r\nSubject: lf\r\n\r\none\ntwo  \n\n",
}


@pytest.mark.parametrize("name", sorted(_MESSAGES))
def test_each_signature_is_dkimpys_own_and_verifies(name: str) -> None:
    """RSA-2048 and Ed25519 side by side on edge-case messages: byte for byte dkimpy's signature; verified."""
    message = _MESSAGES[name]
    rsa_key, ed_key = rsa.generate_private_key(65537, 2048), ed25519.Ed25519PrivateKey.generate()
    keys = [DkimKey("belfry.test", "r1", "rsa-sha256", rsa_key), DkimKey("belfry.test", "e1", "ed25519-sha256", ed_key)]
    signed = DkimSigner(keys, clock=lambda: 1_790_000_000.7).sign(message)
    assert signed.endswith(message)
    assert all(len(line) <= 78 for line in signed[: -len(message)].split(b"\r\n"))
    ours = [_tags(s) for s in _signatures(signed)]
    assert [s[b"t"] for s in ours] == [b"1790000000"] * 2
    assert ours == [
        _dkimpy_signature(message, rsa_key, b"r1", b"belfry.test", 1_790_000_000),
        _dkimpy_signature(message, ed_key, b"e1", b"belfry.test", 1_790_000_000),
    ]
    zone = Zone()
    zone.publish("r1", "belfry.test", rsa_key)
    zone.publish("e1", "belfry.test", ed_key)
    assert _verified(signed, zone) == [True, True]
    assert bool(dkim.verify(signed, dnsfunc=zone))  # dkimpy's one-call verifier, on the first signature
    assert _verified(signed.replace(b"From: ", b"From: x", 1), zone) == [False, False]


async def test_with_verp_the_envelope_domain_signs_too_and_headers_stay_consistent(
    database_url: str,
    token_keys: dict[str, bytes],
    pool: asyncpg.Pool,
    smtp: tuple[Capture, int],
    account_id: str,
    keys: dict[str, tuple[Path, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey]],
) -> None:
    capture, port = smtp
    (ed_path, ed_key), (bounce_path, bounce_key) = keys["ed"], keys["bounce"]
    config = f"belfry.test:ed2026:ed25519-sha256:{ed_path};bounce.belfry.test:b1:ed25519-sha256:{bounce_path}"
    env = email_env(
        database_url,
        token_keys,
        port,
        BELFRY_EMAIL_DKIM_KEYS=config,
        BELFRY_EMAIL_VERP_KEYS=VERP_KEY,
        BELFRY_EMAIL_BOUNCE_DOMAIN="bounce.belfry.test",
    )
    zone = Zone()
    zone.publish("ed2026", "belfry.test", ed_key)
    zone.publish("b1", "bounce.belfry.test", bounce_key)
    await _send(env, pool, capture, account_id, 1)
    [caught] = [c for c in capture.snapshot() if c.rcpt_tos == ["dkim0@example.test"]]
    assert sorted(s[b"d"] for s in _signatures(caught.raw)) == [b"belfry.test", b"bounce.belfry.test"]
    assert _verified(caught.raw, zone) == [True, True]
    mail = caught.parsed
    # Return-Path is the receiving MTA's to write (RFC 5321 §4.4), from this envelope sender.
    assert caught.mail_from.endswith("@bounce.belfry.test")
    assert mail["Return-Path"] is None
    # One From mailbox, so no Sender (RFC 5322 §3.6.2); replies go to From, so no Reply-To.
    assert mail["Sender"] is None and mail["Reply-To"] is None
    assert mail["From"].addresses[0].addr_spec == "notify@belfry.test"
    assert mail["Auto-Submitted"] == "auto-generated"
    assert mail["Feedback-ID"] == f"account.billing:{_safe(account_id)}:belfry"


async def test_without_keys_mail_is_unsigned_and_carries_the_headers(
    database_url: str, token_keys: dict[str, bytes], pool: asyncpg.Pool, smtp: tuple[Capture, int], account_id: str
) -> None:
    capture, port = smtp
    for raw in await _send(email_env(database_url, token_keys, port), pool, capture, account_id, 2):
        assert b"DKIM-Signature" not in raw
        caught = next(c for c in capture.snapshot() if c.raw == raw)
        mail = caught.parsed
        assert caught.mail_from == "notify@belfry.test"  # no VERP: the From address is the envelope sender
        assert mail["Auto-Submitted"] == "auto-generated"
        assert mail["Feedback-ID"] in {
            f"account.billing:{_safe(account_id)}:belfry",
            f"contacts.contact_assigned:{_safe(account_id)}:belfry",
        }
        assert (
            caught.rcpt_tos[0] not in mail["Feedback-ID"] and "dkim" not in mail["Feedback-ID"]
        )  # no user, no address


def _safe(account_id: str) -> str:
    return "".join(c for c in account_id if c.isalnum() or c in ".-_")[:64]


def test_feedback_id_fields_cannot_be_shifted() -> None:
    assert feedback_id("contacts.assigned", "acc:1 é\r\n") == "contacts.assigned:acc1:belfry"
    assert feedback_id("t", "a" * 100) == f"t:{'a' * 64}:belfry"


def _problems(token_keys: dict[str, bytes], config: str, **extra: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(email_env("postgresql://unused/db", token_keys, 25, BELFRY_EMAIL_DKIM_KEYS=config, **extra))
    return caught.value.message


def test_bad_keys_and_algorithms_are_refused_at_start_all_at_once(
    token_keys: dict[str, bytes],
    keys: dict[str, tuple[Path, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey]],
    tmp_path: Path,
) -> None:
    rsa_path, ed_path = keys["rsa"][0], keys["ed"][0]
    short = tmp_path / "short.pem"
    d = pow(65537, -1, (_P - 1) * (_Q - 1))
    numbers = rsa.RSAPrivateNumbers(
        _P, _Q, d, d % (_P - 1), d % (_Q - 1), pow(_Q, -1, _P), rsa.RSAPublicNumbers(65537, _P * _Q)
    )
    short.write_bytes(_pem(numbers.private_key()))
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
        )
    )
    not_a_key = tmp_path / "cert.txt"
    not_a_key.write_text("hello")
    entries = {
        f"belfry.test:a:rsa-sha1:{rsa_path}": "entry 1: unknown algorithm 'rsa-sha1'; use rsa-sha256 or ed25519-sha256",
        f"belfry.test:b:rsa-sha256:{ed_path}": f"entry 2: {ed_path} holds an Ed25519 key, but rsa-sha256 needs an RSA key",
        f"belfry.test:c:ed25519-sha256:{rsa_path}": f"entry 3: {rsa_path} holds an RSA key, but ed25519-sha256 needs an Ed25519 key",
        f"belfry.test:d:rsa-sha256:{tmp_path / 'missing.pem'}": f"entry 4: cannot read {tmp_path / 'missing.pem'}",
        f"belfry.test:e:rsa-sha256:{short}": f"entry 5: {short} is a 768-bit RSA key; RFC 8301 needs at least 1024",
        f"belfry.test:f:ed25519-sha256:{encrypted}": f"entry 6: {encrypted} holds an encrypted key",
        f"belfry.test:g:ed25519-sha256:{not_a_key}": f"entry 7: {not_a_key} does not hold a PEM private key",
        f"example.org:h:ed25519-sha256:{ed_path}": "entry 8: 'example.org' is not a domain this sender uses (belfry.test)",
        f"belfry.test:bad_selector:ed25519-sha256:{ed_path}": "entry 9: 'bad_selector' is not a selector",
        "belfry.test:rsa-sha256:/only/three": "entry 10 must be domain:selector:algorithm:/path/to/key.pem",
        f"belfry.test:z:ed25519-sha256:{ed_path}": "",
        f"belfry.test:z:rsa-sha256:{rsa_path}": "entry 12: selector 'z' of 'belfry.test' is listed twice",
    }
    message = _problems(token_keys, ";".join(entries))
    for expected in filter(None, entries.values()):
        assert f"BELFRY_EMAIL_DKIM_KEYS {expected}" in message, expected
    assert "entry 11" not in message
    assert "BEGIN" not in message and "PRIVATE" not in message  # never the key itself


def test_good_keys_load_and_only_for_the_domains_mail_is_sent_under(
    token_keys: dict[str, bytes], keys: dict[str, tuple[Path, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey]]
) -> None:
    config = f"belfry.test:r:rsa-sha256:{keys['rsa'][0]};belfry.test:e:ed25519-sha256:{keys['ed'][0]}"
    settings = load_settings(email_env("postgresql://unused/db", token_keys, 25, BELFRY_EMAIL_DKIM_KEYS=config))
    assert [(k.domain, k.selector, k.algorithm) for k in settings.dkim] == [
        ("belfry.test", "r", "rsa-sha256"),
        ("belfry.test", "e", "ed25519-sha256"),
    ]
    assert "PRIVATE" not in repr(settings.dkim) and "private=" not in repr(settings.dkim)
    assert load_settings(email_env("postgresql://unused/db", token_keys, 25)).dkim == ()
    # The bounce domain counts only when VERP sends under it.
    assert "'bounce.belfry.test' is not a domain this sender uses" in _problems(
        token_keys,
        f"bounce.belfry.test:b:ed25519-sha256:{keys['ed'][0]}",
        BELFRY_EMAIL_BOUNCE_DOMAIN="bounce.belfry.test",
    )
