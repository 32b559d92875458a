"""The bounce receiver (issue "Deliverability", bounces and complaints): a real Postfix bounces a real
notification to its VERP envelope sender and the receiver suppresses the address; hand-made reports
(ARF complaint, 4.x.x and 5.7.x DSNs, garbage) sent straight to the receiver; forged tokens refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiosmtplib
import asyncpg
import pytest
from belfry import service
from belfry.errors import ConfigError
from hypothesis import given
from hypothesis import settings as examples
from hypothesis import strategies as st

from services.email import reports, store
from services.email.bounces import REFUSED, BounceReceiver
from services.email.server import EmailBuild, build_for
from services.email.settings import BounceSettings, load_settings
from services.email.verp import Verp
from tests.email.email_helpers import Capture, email_env, enqueue_messages, message, wait_until_finished
from tests.email.postfix import POSTFIX, Postfix

VERP_KEY = "verp-key-for-bounce-tests-only-0123456789"
BOUNCE_DOMAIN = "bounce.belfry.test"
RECIPIENT_DOMAIN = "example.test"


@dataclass
class Receiving:
    """A started email service with its bounce receiver."""

    build: EmailBuild
    verp: Verp

    @property
    def port(self) -> int:
        return self.build.bounce_port


@asynccontextmanager
async def email_service(
    database_url: str, token_keys: dict[str, bytes], smtp_port: int, **extra: str
) -> AsyncIterator[Receiving]:
    """The email service sending to ``smtp_port``, VERP on, the bounce receiver on a free port."""
    env = email_env(
        database_url,
        token_keys,
        smtp_port,
        BELFRY_EMAIL_VERP_KEYS=VERP_KEY,
        BELFRY_EMAIL_BOUNCE_DOMAIN=BOUNCE_DOMAIN,
        BELFRY_EMAIL_BOUNCE_ADDRESS="127.0.0.1:0",
        **extra,
    )
    settings = load_settings(env)
    assert settings.verp is not None
    build = build_for(settings)
    running = await service.start("email", settings.common, build)
    try:
        assert build.bounce_port > 0
        yield Receiving(build, settings.verp)
    finally:
        await running.stop(0.1)


async def sent_delivery(pool: asyncpg.Pool, account_id: str, address: str, user_id: str) -> int:
    """Send one notification to ``address`` (through the running service); its delivery id once sent."""
    await enqueue_messages(pool, [message(account_id, user_id=user_id, recipient_email=address)])
    total = await pool.fetchval("select count(*) from queue.deliveries where account_id = $1", account_id)
    rows = await wait_until_finished(pool, account_id, total, states=("sent",))
    [row] = [r for r in rows if r["user_id"] == user_id]
    return int(row["delivery_id"])


async def report_to(port: int, rcpt: str, raw: bytes) -> None:
    """Hand ``raw`` to the receiver as a relay would: null sender, one VERP recipient."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10, start_tls=False) as client:
        await client.sendmail("", [rcpt], raw)


def dsn(recipient: str, action: str, status: str, diagnostic: str) -> bytes:
    """An RFC 3464 report about ``recipient`` as a remote MTA writes it."""
    return (
        "From: MAILER-DAEMON@mx.example.test\r\n"
        "To: bounces@bounce.belfry.test\r\n"
        "Subject: Delivery Status Notification\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n'
        "\r\n"
        "--b1\r\n"
        "Content-Type: text/plain\r\n"
        "\r\n"
        "Your message could not be delivered yet.\r\n"
        "--b1\r\n"
        "Content-Type: message/delivery-status\r\n"
        "\r\n"
        "Reporting-MTA: dns; mx.example.test\r\n"
        "\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\n"
        f"Action: {action}\r\n"
        f"Status: {status}\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n"
        "\r\n"
        "--b1\r\n"
        "Content-Type: text/rfc822-headers\r\n"
        "\r\n"
        "Subject: Contact 42 was assigned to you\r\n"
        "\r\n"
        "--b1--\r\n"
    ).encode()


def arf(recipient: str, feedback_type: str = "abuse") -> bytes:
    """An RFC 5965 feedback report (a user pressed "this is spam")."""
    return (
        "From: fbl@isp.example.test\r\n"
        "To: bounces@bounce.belfry.test\r\n"
        "Subject: Complaint about message\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="f1"\r\n'
        "\r\n"
        "--f1\r\n"
        "Content-Type: text/plain\r\n"
        "\r\n"
        "This is an email abuse report.\r\n"
        "--f1\r\n"
        "Content-Type: message/feedback-report\r\n"
        "\r\n"
        f"Feedback-Type: {feedback_type}\r\n"
        "User-Agent: ExampleFBL/1.0\r\n"
        "Version: 1\r\n"
        f"Original-Rcpt-To: {recipient}\r\n"
        "Source-IP: 192.0.2.1\r\n"
        "\r\n"
        "--f1\r\n"
        "Content-Type: message/rfc822\r\n"
        "\r\n"
        "From: notify@belfry.test\r\n"
        f"To: {recipient}\r\n"
        "Subject: Contact 42 was assigned to you\r\n"
        "\r\n"
        "Ana assigned Contact 42 to you.\r\n"
        "--f1--\r\n"
    ).encode()


async def suppression(pool: asyncpg.Pool, account_id: str, address: str) -> store.Suppression | None:
    """The account's entry for ``address``, if any."""
    found = await store.list_suppressions(
        pool, account_id, search=address, after_address="", limit=10, soft_expiry_seconds=7 * 86400.0
    )
    return next((s for s in found if s.address == address.lower()), None)


@pytest.fixture
def postfix() -> Iterator[Postfix]:
    """A private Postfix instance (started by the test, once the receiver's port is known); always stopped."""
    if not POSTFIX.exists():
        pytest.skip(
            "/usr/sbin/postfix is not installed (Debian: debconf-set-selections <<< "
            "'postfix postfix/main_mailer_type select No configuration'; apt-get install -y postfix)"
        )
    instance = Postfix(RECIPIENT_DOMAIN, BOUNCE_DOMAIN)
    try:
        yield instance
    finally:
        instance.stop()


async def test_a_real_postfix_bounce_suppresses_the_address(
    database_url: str,
    token_keys: dict[str, bytes],
    pool: asyncpg.Pool,
    postfix: Postfix,
    smtp: tuple[Capture, int],
    account_id: str,
) -> None:
    capture, capture_port = smtp
    address = f"reject-{account_id}@{RECIPIENT_DOMAIN}"  # the capture answers 550 5.1.1 to reject*
    async with email_service(database_url, token_keys, postfix.port) as receiving:
        await asyncio.to_thread(postfix.start, capture_port, receiving.port)
        # Postfix accepts the message (the delivery is sent), relays it to the destination, which
        # refuses the recipient with 5.1.1; Postfix's bounce daemon then mails an RFC 3464 report
        # to the VERP envelope sender, which its transport map sends to the receiver.
        delivery_id = await sent_delivery(pool, account_id, address, "u1")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60.0
        while True:  # polling the database, as wait_until_finished does
            entry = await suppression(pool, account_id, address)
            if entry is not None or loop.time() > deadline:
                break
            await asyncio.sleep(0.05)
        assert entry is not None, f"no suppression; postfix log:\n{postfix.maillog()}"
        assert entry.reason == store.HARD_BOUNCE
        assert entry.detail.startswith("5.1.1 ") and "550 5.1.1 no such mailbox here" in entry.detail
        assert entry.source_delivery == delivery_id
        [feedback] = await store.feedback_of(pool, account_id, delivery_id)
        assert (feedback.kind, feedback.address, feedback.status) == ("hard bounce", address, "5.1.1")
        # Only this account: the same address stays mailable for another one.
        assert await suppression(pool, account_id + "-other", address) is None

        # The next notification to it is dropped before any SMTP traffic: Postfix never sees it.
        handed = postfix.maillog().count(f"to=<{address}>")
        await pool.execute("delete from queue.deliveries where account_id = $1", account_id)
        await enqueue_messages(pool, [message(account_id, user_id="u2", recipient_email=address.upper())])
        [dropped] = await wait_until_finished(pool, account_id, 1)
        assert dropped["state"] == "dropped"
        assert [e["error"] for e in dropped["errors"]] == ["address suppressed (hard bounce)"]
        assert postfix.maillog().count(f"to=<{address}>") == handed
        assert capture.snapshot() == []  # the destination accepted nothing, ever


async def test_a_complaint_suppresses_and_other_feedback_types_do_not(
    database_url: str, token_keys: dict[str, bytes], pool: asyncpg.Pool, smtp: tuple[Capture, int], account_id: str
) -> None:
    _capture, port = smtp
    async with email_service(database_url, token_keys, port) as receiving:
        angry = f"angry@{RECIPIENT_DOMAIN}"
        calm = f"calm@{RECIPIENT_DOMAIN}"
        first = await sent_delivery(pool, account_id, angry, "u1")
        second = await sent_delivery(pool, account_id, calm, "u2")
        await report_to(receiving.port, receiving.verp.address(account_id, first, angry), arf(angry))
        await report_to(receiving.port, receiving.verp.address(account_id, second, calm), arf(calm, "not-spam"))

        entry = await suppression(pool, account_id, angry)
        assert entry is not None and entry.reason == store.COMPLAINT and entry.source_delivery == first
        assert "Feedback-Type: abuse" in entry.detail and "ExampleFBL/1.0" in entry.detail
        [feedback] = await store.feedback_of(pool, account_id, first)
        assert (feedback.kind, feedback.status) == ("complaint", "abuse")
        assert await suppression(pool, account_id, calm) is None
        assert await store.feedback_of(pool, account_id, second) == []


async def test_soft_bounces_count_until_the_limit_and_policy_bounces_never_suppress(
    database_url: str, token_keys: dict[str, bytes], pool: asyncpg.Pool, smtp: tuple[Capture, int], account_id: str
) -> None:
    _capture, port = smtp
    async with email_service(database_url, token_keys, port, BELFRY_EMAIL_SOFT_BOUNCE_LIMIT="3") as receiving:
        full = f"full@{RECIPIENT_DOMAIN}"
        deliveries = [await sent_delivery(pool, account_id, full, f"u{i}") for i in range(3)]
        for count, delivery_id in enumerate(deliveries, start=1):
            rcpt = receiving.verp.address(account_id, delivery_id, full)
            await report_to(receiving.port, rcpt, dsn(full, "delayed", "4.2.2", "452 4.2.2 mailbox full"))
            entry = await suppression(pool, account_id, full)
            if count < 3:
                assert entry is None, f"suppressed after {count} soft bounces"
            else:
                assert entry is not None and entry.reason == store.SOFT_BOUNCES
                assert entry.detail == "4.2.2 smtp; 452 4.2.2 mailbox full"
        kinds = [f.kind for d in deliveries for f in await store.feedback_of(pool, account_id, d)]
        assert kinds == ["soft bounce"] * 3

        # One report is one soft bounce, however many blocks it repeats.
        busy = f"busy@{RECIPIENT_DOMAIN}"
        delivery_id = await sent_delivery(pool, account_id, busy, "b1")
        block = dsn(busy, "delayed", "4.2.2", "452 4.2.2 mailbox full")
        head, sep, tail = block.partition(b"--b1\r\nContent-Type: text/rfc822-headers")
        recipient_block = head[head.index(b"Final-Recipient") :]
        repeated = head + recipient_block * 4 + sep + tail
        await report_to(receiving.port, receiving.verp.address(account_id, delivery_id, busy), repeated)
        assert len(await store.feedback_of(pool, account_id, delivery_id)) == 1
        assert await suppression(pool, account_id, busy) is None

        strict = f"strict@{RECIPIENT_DOMAIN}"
        delivery_id = await sent_delivery(pool, account_id, strict, "p1")
        rcpt = receiving.verp.address(account_id, delivery_id, strict)
        await report_to(receiving.port, rcpt, dsn(strict, "failed", "5.7.1", "550 5.7.1 message refused as spam"))
        assert await suppression(pool, account_id, strict) is None
        [policy] = await store.feedback_of(pool, account_id, delivery_id)
        assert (policy.kind, policy.status) == ("policy bounce", "5.7.1")


async def test_forged_and_foreign_tokens_are_refused_at_rcpt(
    database_url: str, token_keys: dict[str, bytes], pool: asyncpg.Pool, smtp: tuple[Capture, int], account_id: str
) -> None:
    _capture, port = smtp
    async with email_service(database_url, token_keys, port) as receiving:
        victim = f"victim@{RECIPIENT_DOMAIN}"
        delivery_id = await sent_delivery(pool, account_id, victim, "u1")
        genuine = receiving.verp.address(account_id, delivery_id, victim)
        local, domain = genuine.split("@")
        mac = local.rsplit("-", 1)[1]
        forged = [
            genuine.replace(mac, "a" * 16),  # a made-up MAC
            receiving.verp.address(account_id, delivery_id, f"someone-else@{RECIPIENT_DOMAIN}"),  # signed for another
            receiving.verp.address(account_id, delivery_id + 1_000_000, victim),  # a delivery that does not exist
            Verp([b"another-deployment-key-0123456789abcdef"], BOUNCE_DOMAIN).address(account_id, delivery_id, victim),
            f"{local}@elsewhere.test",  # another bounce domain
            f"postmaster@{domain}",
        ]
        for rcpt in forged:
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
                await report_to(receiving.port, rcpt, dsn(victim, "failed", "5.1.1", "550 5.1.1 no such user"))
            [(code, text)] = [(r.code, r.message) for r in refused.value.recipients]
            assert (code, text) == (550, REFUSED.removeprefix("550 ")), rcpt
        assert await suppression(pool, account_id, victim) is None
        assert await store.feedback_of(pool, account_id, delivery_id) == []


async def test_garbage_is_accepted_and_ignored_and_size_is_bounded(
    database_url: str, token_keys: dict[str, bytes], pool: asyncpg.Pool, smtp: tuple[Capture, int], account_id: str
) -> None:
    _capture, port = smtp
    limit = 16 * 1024
    async with email_service(database_url, token_keys, port, BELFRY_EMAIL_BOUNCE_MAX_BYTES=str(limit)) as receiving:
        address = f"target@{RECIPIENT_DOMAIN}"
        delivery_id = await sent_delivery(pool, account_id, address, "u1")
        rcpt = receiving.verp.address(account_id, delivery_id, address)
        garbage = [
            b"\x00\xff\xfe not mail at all \x80\x81\r\n",
            b"Subject: out of office\r\n\r\nI am away until Monday.\r\n",
            b'Content-Type: multipart/report; report-type=delivery-status; boundary="x"\r\n\r\n--x\r\nbroken',
            b"Content-Type: message/delivery-status\r\n\r\nAction: failed\r\nStatus: 5.1.1\r\n",
            # A well-formed report about another address: the token vouches for its own recipient only.
            dsn(f"bystander@{RECIPIENT_DOMAIN}", "failed", "5.1.1", "550 5.1.1 no such user"),
            arf(f"bystander@{RECIPIENT_DOMAIN}"),
        ]
        for raw in garbage:
            await report_to(receiving.port, rcpt, raw)  # accepted: refusing would only bounce the bounce
        assert await store.feedback_of(pool, account_id, delivery_id) == []
        assert await suppression(pool, account_id, address) is None
        assert await suppression(pool, account_id, f"bystander@{RECIPIENT_DOMAIN}") is None

        with pytest.raises(aiosmtplib.SMTPResponseException) as too_big:
            await report_to(receiving.port, rcpt, dsn(address, "failed", "5.1.1", "x" * (limit + 1)))
        assert too_big.value.code == 552
        assert await suppression(pool, account_id, address) is None
        # Still serving after all that: a genuine report is applied.
        await report_to(receiving.port, rcpt, dsn(address, "failed", "5.1.1", "550 5.1.1 no such user"))
        entry = await suppression(pool, account_id, address)
        assert entry is not None and entry.reason == store.HARD_BOUNCE


def test_the_receiver_needs_verp_and_is_off_by_default(token_keys: dict[str, bytes]) -> None:
    base = email_env("postgresql://unused/db", token_keys, 25)
    assert load_settings(base).bounces is None
    with pytest.raises(ConfigError) as caught:
        load_settings({**base, "BELFRY_EMAIL_BOUNCE_ADDRESS": "127.0.0.1:2525"})
    assert "BELFRY_EMAIL_VERP_KEYS" in caught.value.message
    on = load_settings({**base, "BELFRY_EMAIL_BOUNCE_ADDRESS": "[::]:2525", "BELFRY_EMAIL_VERP_KEYS": VERP_KEY})
    assert on.bounces is not None and (on.bounces.host, on.bounces.port) == ("::", 2525)
    assert (on.bounces.soft_limit, on.bounces.max_bytes) == (5, 1024 * 1024)


async def test_an_ipv6_wildcard_address_also_takes_ipv4(pool: asyncpg.Pool) -> None:
    settings = BounceSettings("::", 0, 64 * 1024, 5, 3600.0, BOUNCE_DOMAIN)
    receiver = BounceReceiver(pool, Verp([VERP_KEY.encode()], BOUNCE_DOMAIN), settings, shared=False)
    port = await receiver.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert (await reader.readline()).startswith(b"220 bounce.belfry.test ")
        finally:
            writer.close()
            await writer.wait_closed()
    finally:
        await receiver.close()


@examples(max_examples=300, deadline=None)
@given(cut=st.integers(min_value=0, max_value=2000), junk=st.binary(max_size=64))
def test_reading_damaged_reports_never_raises(cut: int, junk: bytes) -> None:
    # What the receiver parses comes from anyone who can reach it: any damage reads as "nothing".
    for report in (dsn("x@example.test", "failed", "5.1.1", "550 5.1.1 gone"), arf("x@example.test")):
        damaged = report[:cut] + junk + report[cut:]
        found = reports.read(damaged)
        assert found is None or all(isinstance(f, reports.Finding) for f in found)
