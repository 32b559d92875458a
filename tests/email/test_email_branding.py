"""Per-account branding (issue "Deliverability", 4): super admins set the From name and address, Reply-To,
logo, accent colour and footer over real gRPC; the real sender's next email to the real SMTP capture carries
them, still DKIM-signed by the From domain (dkimpy's verifier, keys through a stub resolver); refusals store
nothing; an account without branding gets the defaults."""

from __future__ import annotations

from email.headerregistry import Address
from email.message import EmailMessage
from pathlib import Path

import asyncpg
import grpc
import pytest
from belfry import rpc, service
from belfry.api.email.v1 import email_pb2 as pb
from belfry.api.email.v1 import email_pb2_grpc as pb_grpc
from belfry.auth import TokenIssuer
from belfry.errors import ConfigError
from cryptography.hazmat.primitives.asymmetric import ed25519

from services.email.branding import DEFAULT_ACCENT, Branding, identity
from services.email.server import build_for
from services.email.settings import load_settings
from tests.conftest import client_tls
from tests.email.email_helpers import Capture, email_env, enqueue_messages, message, seed, wait_until_finished
from tests.email.test_email_dkim import Zone, _pem, _signatures, _verified

FOOTER = 'Acme Ltd, 1 Main St\n<script>alert("x")</script> & <b>bold</b>'


def _parts(mail: EmailMessage) -> tuple[str, str]:
    text, html = mail.get_body(("plain",)), mail.get_body(("html",))
    assert text is not None and html is not None
    return str(text.get_content()), str(html.get_content())


@pytest.fixture(scope="module")
def brand_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, ed25519.Ed25519PrivateKey]]:
    """Ed25519 keys for the operator's From domain and for a domain accounts may send From."""
    folder = tmp_path_factory.mktemp("dkim-branding")
    found = {}
    for domain in ("belfry.test", "mail.acme.test"):
        key = ed25519.Ed25519PrivateKey.generate()
        path = folder / f"{domain}.pem"
        path.write_bytes(_pem(key))
        found[domain] = (path, key)
    return found


def _env(
    database_url: str,
    token_keys: dict[str, bytes],
    port: int,
    directory: str,
    keys: dict[str, tuple[Path, ed25519.Ed25519PrivateKey]],
) -> dict[str, str]:
    return email_env(
        database_url,
        token_keys,
        port,
        BELFRY_PREFERENCES_ADDRESS=directory,
        BELFRY_EMAIL_BRANDING_DOMAINS="mail.acme.test",
        BELFRY_EMAIL_DKIM_KEYS=";".join(f"{d}:s1:ed25519-sha256:{path}" for d, (path, _) in keys.items()),
    )


async def _sent(pool: asyncpg.Pool, capture: Capture, account_id: str, user_id: str, count: int) -> EmailMessage:
    await enqueue_messages(pool, [message(account_id, user_id=user_id)])
    done = await wait_until_finished(pool, account_id, count)
    assert [d["state"] for d in done] == ["sent"] * count
    [caught] = [c for c in capture.snapshot() if c.rcpt_tos == [f"{user_id}@example.test"]]
    return caught.parsed


async def test_a_super_admin_brands_the_accounts_emails_and_they_stay_signed(
    database_url: str,
    token_keys: dict[str, bytes],
    pool: asyncpg.Pool,
    smtp: tuple[Capture, int],
    directory: str,
    account_id: str,
    brand_keys: dict[str, tuple[Path, ed25519.Ed25519PrivateKey]],
) -> None:
    capture, port = smtp
    other = account_id + "-plain"
    await seed(directory, account_id, admin=(True, True))
    await seed(directory, other, admin=(True, True))
    settings = load_settings(_env(database_url, token_keys, port, directory, brand_keys))
    running = await service.start("email", settings.common, build_for(settings))
    channel = rpc.connect(f"127.0.0.1:{running.port}", client_tls())
    stub = pb_grpc.DeliverabilityStub(channel)
    admin = [("authorization", f"Bearer {TokenIssuer(token_keys, 'k1').issue(account_id, 'admin')}")]
    zone = Zone()
    for domain, (_, key) in brand_keys.items():
        zone.publish("s1", domain, key)
    try:
        # Unset: the defaults (and the sender now holds "no branding" for the account in its cache).
        got = await stub.GetBranding(pb.GetBrandingRequest(), metadata=admin)
        assert got.branding == pb.Branding()
        before = await _sent(pool, capture, account_id, "first", 1)
        assert before["From"].addresses[0].addr_spec == "notify@belfry.test" and before["Reply-To"] is None

        wanted = pb.Branding(
            from_name="Acme News",
            from_address="news@Mail.Acme.test",
            reply_to="support@acme.test",
            logo_url="https://cdn.acme.test/logo.png?v=2&size=big",
            accent_color="#1A73E8",
            footer=FOOTER,
        )
        stored = await stub.SetBranding(pb.SetBrandingRequest(branding=wanted), metadata=admin)
        assert stored.branding.from_address == "news@mail.acme.test" and stored.branding.accent_color == "#1a73e8"
        got = await stub.GetBranding(pb.GetBrandingRequest(), metadata=admin)
        assert got.branding == stored.branding

        # The very next email (the cache entry was dropped by SetBranding) carries it all.
        mail = await _sent(pool, capture, account_id, "second", 2)
        [sender] = mail["From"].addresses
        assert (sender.display_name, sender.addr_spec) == ("Acme News", "news@mail.acme.test")
        assert [a.addr_spec for a in mail["Reply-To"].addresses] == ["support@acme.test"]
        text, html = _parts(mail)
        assert '<img src="https://cdn.acme.test/logo.png?v=2&amp;size=big" alt="Acme News"' in html
        assert "color: #1a73e8;" in html
        # The footer is text: escaped in HTML, as written in the text part.
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in html
        assert "<script" not in html and "<b>" not in html
        assert "Acme Ltd, 1 Main St" in html
        assert text.rstrip().endswith(FOOTER)
        # Signed by the From domain's key, which verifies; not by the operator's domain.
        caught = next(c.raw for c in capture.snapshot() if c.rcpt_tos == ["second@example.test"])
        assert [s[b"d"] for s in _signatures(caught)] == [b"mail.acme.test"]
        assert _verified(caught, zone) == [True]

        # Another account without branding: the defaults, signed by the operator's domain.
        plain = await _sent(pool, capture, other, "third", 1)
        [default_sender] = plain["From"].addresses
        assert (default_sender.display_name, default_sender.addr_spec) == ("Belfry", "notify@belfry.test")
        assert plain["Reply-To"] is None
        text, html = _parts(plain)
        assert "<img" not in html and f"color: {DEFAULT_ACCENT};" in html and "Acme" not in text + html
        caught = next(c.raw for c in capture.snapshot() if c.rcpt_tos == ["third@example.test"])
        assert [s[b"d"] for s in _signatures(caught)] == [b"belfry.test"]
        assert _verified(caught, zone) == [True]

        # Emptied: back to the defaults.
        await stub.SetBranding(pb.SetBrandingRequest(), metadata=admin)
        again = await _sent(pool, capture, account_id, "fourth", 3)
        assert again["From"].addresses[0].addr_spec == "notify@belfry.test" and again["Reply-To"] is None
    finally:
        await channel.close()
        await running.stop(0.1)


async def test_only_super_admins_and_only_valid_fields_are_stored(
    database_url: str,
    token_keys: dict[str, bytes],
    pool: asyncpg.Pool,
    smtp: tuple[Capture, int],
    directory: str,
    account_id: str,
    brand_keys: dict[str, tuple[Path, ed25519.Ed25519PrivateKey]],
) -> None:
    _, port = smtp
    await seed(directory, account_id, admin=(True, True), plain=(False, True), former=(True, False))
    settings = load_settings(_env(database_url, token_keys, port, directory, brand_keys))
    running = await service.start("email", settings.common, build_for(settings))
    channel = rpc.connect(f"127.0.0.1:{running.port}", client_tls())
    stub = pb_grpc.DeliverabilityStub(channel)
    issuer = TokenIssuer(token_keys, "k1")
    admin = [("authorization", f"Bearer {issuer.issue(account_id, 'admin')}")]
    good = pb.Branding(from_name="Acme", from_address="news@belfry.test", accent_color="#00ff00")

    async def stored() -> list[asyncpg.Record]:
        return await pool.fetch("select * from email.branding where account_id = $1", account_id)

    try:
        for user_id in ("plain", "former", "ghost"):
            meta = [("authorization", f"Bearer {issuer.issue(account_id, user_id)}")]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.SetBranding(pb.SetBrandingRequest(branding=good), metadata=meta)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, user_id
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetBranding(pb.GetBrandingRequest(), metadata=meta)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, user_id
        assert await stored() == []

        bad = {
            "logo_url": pb.Branding(logo_url="http://cdn.acme.test/logo.png"),
            "accent_color": pb.Branding(accent_color="red; background:url(x)"),
            "from_address": pb.Branding(from_address="news@elsewhere.test"),
            "from_name": pb.Branding(from_name="Acme\r\nBcc: victim@example.test"),
        }
        more = {
            "logo_url": [
                pb.Branding(logo_url="javascript:alert(1)"),
                pb.Branding(logo_url="https://cdn.acme.test/" + "a" * 2048),
            ],
            "accent_color": [pb.Branding(accent_color="#12345"), pb.Branding(accent_color="#12345g")],
            "from_address": [pb.Branding(from_address="Acme <news@belfry.test>")],
            "from_name": [pb.Branding(from_name="a" * 101)],
            "reply_to": [pb.Branding(reply_to="not an address")],
            "footer": [pb.Branding(footer="x" * 501), pb.Branding(footer="bell\x07")],
        }
        cases = list(bad.items()) + [(name, b) for name, bs in more.items() for b in bs]
        for name, branding in cases:
            # Otherwise valid fields alongside the bad one: nothing of it is stored.
            request = pb.Branding()
            request.CopyFrom(good)
            request.MergeFrom(branding)
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await stub.SetBranding(pb.SetBrandingRequest(branding=request), metadata=admin)
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, branding)
            assert name in (invalid.value.details() or ""), (name, invalid.value.details())
        assert await stored() == []

        done = await stub.SetBranding(pb.SetBrandingRequest(branding=good), metadata=admin)
        assert done.branding == good
        [row] = await stored()
        assert (row["from_name"], row["from_address"], row["updated_by"]) == ("Acme", "news@belfry.test", "admin")
        # A later invalid call leaves the stored branding as it was.
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.SetBranding(
                pb.SetBrandingRequest(branding=pb.Branding(logo_url="ftp://x.test/a")), metadata=admin
            )
        assert await stored() == [row]
    finally:
        await channel.close()
        await running.stop(0.1)


def test_a_branding_domain_needs_a_dkim_key(
    token_keys: dict[str, bytes], brand_keys: dict[str, tuple[Path, ed25519.Ed25519PrivateKey]]
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            email_env("postgresql://unused/db", token_keys, 25, BELFRY_EMAIL_BRANDING_DOMAINS="mail.acme.test")
        )
    assert "mail.acme.test need a key in BELFRY_EMAIL_DKIM_KEYS" in caught.value.message
    settings = load_settings(email_env("postgresql://unused/db", token_keys, 25))
    assert settings.from_domains == {"belfry.test"}
    path = brand_keys["mail.acme.test"][0]
    settings = load_settings(
        email_env(
            "postgresql://unused/db",
            token_keys,
            25,
            BELFRY_EMAIL_BRANDING_DOMAINS="Mail.Acme.test",
            BELFRY_EMAIL_DKIM_KEYS=f"mail.acme.test:s1:ed25519-sha256:{path}",
        )
    )
    assert settings.from_domains == {"belfry.test", "mail.acme.test"}


def test_a_stored_row_that_skipped_the_checks_cannot_reach_the_html() -> None:
    """Compose checks the colour and the logo again: a row written by hand falls back to the defaults."""
    default = Address("Belfry", "notify", "belfry.test")
    look = identity(Branding(logo_url="http://x.test/a.png", accent_color="red; background:url(x)"), default).look
    assert look.logo_url == "" and look.accent == DEFAULT_ACCENT
    assert identity(None, default).sender == default
    named = identity(Branding(from_name="Acme\r\nBcc: x@y.test"), default).sender
    assert named.display_name == "Acme Bcc: x@y.test" and named.addr_spec == "notify@belfry.test"
