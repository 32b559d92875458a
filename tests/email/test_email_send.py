"""The email service end to end: queue → real SMTP server, headers, templates, error classes."""

from __future__ import annotations

import html
from collections.abc import AsyncIterator
from datetime import timedelta
from email.message import EmailMessage
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
from belfry import service
from belfry.unsubscribe import Signer

from services.email.compose import message_id
from services.email.server import build_for
from services.email.settings import load_settings
from tests.email.email_helpers import (
    UNSUBSCRIBE_KEY,
    Capture,
    email_env,
    enqueue_messages,
    items,
    message,
    wait_until_finished,
)


def _part(mail: EmailMessage, kind: str) -> str:
    part = mail.get_body(preferencelist=(kind,))
    assert part is not None, f"no {kind} part"
    return str(part.get_content())


@pytest.fixture
async def running(
    database_url: str, token_keys: dict[str, bytes], smtp: tuple[Capture, int]
) -> AsyncIterator[service.Running]:
    """The email service, in-process, sending to the capture server."""
    settings = load_settings(email_env(database_url, token_keys, smtp[1]))
    started = await service.start("email", settings.common, build_for(settings))
    yield started
    await started.stop(0.1)


async def test_sends_french_merged_email_with_stable_message_id(
    running: service.Running, pool: asyncpg.Pool, smtp: tuple[Capture, int], account_id: str
) -> None:
    capture, _ = smtp
    msg = message(account_id, locale="fr-FR", items=items(3), title="<b>3 contacts</b>")
    await enqueue_messages(pool, [msg])
    [row] = await wait_until_finished(pool, account_id, 1)
    assert row["state"] == "sent"
    [caught] = [c for c in capture.snapshot() if c.rcpt_tos == [msg.recipient_email]]
    mail = caught.parsed
    assert mail["Message-ID"] == message_id(row["delivery_id"], account_id, "belfry.test")
    assert mail["Subject"] == "3 contacts vous ont été attribués"
    assert mail["To"].addresses[0].display_name == "Ana Tester"
    text = _part(mail, "plain")
    page = _part(mail, "html")
    assert "<b>3 contacts</b>" in text  # plain text stays literal
    assert html.escape("<b>3 contacts</b>") in page and "<b>3 contacts</b>" not in page
    assert "Contact 2" in page and "Préférences de notification" in page
    # One-click unsubscribe: a signed link for this user and topic.
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link = str(mail["List-Unsubscribe"]).strip("<>")
    assert link.startswith("https://app.belfry.test/email/unsubscribe?t=")
    request = Signer(UNSUBSCRIBE_KEY.encode(), ttl_seconds=60).verify(parse_qs(urlsplit(link).query)["t"][0])
    assert (request.account_id, request.user_id, request.topic) == (account_id, "u1", msg.topic)


async def test_locked_topic_says_why_and_has_no_unsubscribe(
    running: service.Running, pool: asyncpg.Pool, smtp: tuple[Capture, int], account_id: str
) -> None:
    capture, _ = smtp
    msg = message(account_id, topic="account.billing", locked=True, title="Your invoice is ready")
    await enqueue_messages(pool, [msg])
    await wait_until_finished(pool, account_id, 1)
    [caught] = [c for c in capture.snapshot() if c.rcpt_tos == [msg.recipient_email]]
    mail = caught.parsed
    assert mail["List-Unsubscribe"] is None and mail["List-Unsubscribe-Post"] is None
    assert "cannot be turned off" in _part(mail, "plain")


async def test_the_date_header_names_utc_as_plus_0000(
    running: service.Running, pool: asyncpg.Pool, smtp: tuple[Capture, int], account_id: str
) -> None:
    capture, _ = smtp
    msg = message(account_id)
    await enqueue_messages(pool, [msg])
    await wait_until_finished(pool, account_id, 1)
    [caught] = [c for c in capture.snapshot() if c.rcpt_tos == [msg.recipient_email]]
    [date] = [line for line in caught.raw.split(b"\r\n") if line.lower().startswith(b"date:")]
    # RFC 5322 §4.3: "GMT" is obsolete syntax and "-0000" means "zone unknown"; UTC is written "+0000".
    assert date.endswith(b" +0000"), date
    sent_at = caught.parsed["Date"].datetime
    assert sent_at.utcoffset() == timedelta(0)


async def test_smtp_replies_map_to_retry_and_dead_letter(
    running: service.Running, pool: asyncpg.Pool, smtp: tuple[Capture, int], account_id: str
) -> None:
    temp = message(account_id, user_id="t", recipient_email="tempfail@example.test")
    perm = message(account_id, user_id="r", recipient_email="reject@example.test")
    await enqueue_messages(pool, [temp, perm])
    [dead] = await wait_until_finished(pool, account_id, 1, states=("dead",))
    assert dead["user_id"] == "r"
    assert "550" in dead["errors"][-1]["error"] and "no such mailbox" in dead["errors"][-1]["error"]
    [retrying] = await wait_until_finished(pool, account_id, 1, states=("queued",))
    assert retrying["user_id"] == "t" and retrying["attempts"] == 1
    assert "451" in retrying["errors"][-1]["error"]
    assert retrying["available_at"] > retrying["created_at"]
    await pool.execute("delete from queue.deliveries where account_id = $1", account_id)
