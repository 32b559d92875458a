"""The "open it" link of emails: a signed gateway ``/open`` link, not the object URL itself.

Followed against a real gateway in tests/gateway/test_gateway_read_state.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from email.message import EmailMessage
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
from belfry import service
from belfry.errors import InvalidArgument
from belfry.openlink import OpenSigner
from belfry.unsubscribe import Links, Signer

from services.email.server import build_for
from services.email.settings import load_settings
from tests.email.email_helpers import (
    UNSUBSCRIBE_KEY,
    Capture,
    email_env,
    enqueue_messages,
    message,
    wait_until_finished,
)

OTHER_KEY = "the-next-unsubscribe-key-for-tests-0123456789"


@pytest.fixture
async def running(
    database_url: str, token_keys: dict[str, bytes], smtp: tuple[Capture, int]
) -> AsyncIterator[service.Running]:
    """The email service, in-process, sending to the capture server."""
    settings = load_settings(email_env(database_url, token_keys, smtp[1]))
    started = await service.start("email", settings.common, build_for(settings))
    yield started
    await started.stop(0.1)


def _parts(mail: EmailMessage) -> tuple[str, str]:
    text = mail.get_body(preferencelist=("plain",))
    page = mail.get_body(preferencelist=("html",))
    assert text is not None and page is not None
    return str(text.get_content()), str(page.get_content())


async def test_the_open_link_goes_through_the_gateway_signed_for_the_notification(
    running: service.Running, pool: asyncpg.Pool, smtp: tuple[Capture, int], account_id: str
) -> None:
    capture, _ = smtp
    english = message(account_id, "u1", recipient_email=f"en-{account_id}@example.test")
    french = message(account_id, "u2", locale="fr", recipient_email=f"fr-{account_id}@example.test")
    bare = message(account_id, "u3", url="", recipient_email=f"bare-{account_id}@example.test")
    hostile = message(account_id, "u4", url="javascript:alert(1)", recipient_email=f"js-{account_id}@example.test")
    await enqueue_messages(pool, [english, french, bare, hostile])
    rows = await wait_until_finished(pool, account_id, 4)
    assert sorted(r["state"] for r in rows) == ["sent"] * 4
    mails = {c.rcpt_tos[0]: c.parsed for c in capture.snapshot() if account_id in c.rcpt_tos[0]}
    verifier = OpenSigner(Links(UNSUBSCRIBE_KEY.encode(), ttl_seconds=60))
    for msg, label in ((english, "Open it: "), (french, "Ouvrir : ")):
        text, page = _parts(mails[msg.recipient_email])
        [line] = [line for line in text.splitlines() if line.startswith(label)]
        link = line.removeprefix(label)
        parts = urlsplit(link)
        assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "https://app.belfry.test/open"
        assert f'href="{link}"' in page
        assert msg.url not in text and msg.url not in page  # no direct link that would bypass the read state
        found = verifier.verify(parse_qs(parts.query)["t"][0])
        assert (found.account_id, found.user_id, found.notification_id, found.target) == (
            account_id,
            msg.user_id,
            msg.notification_id,
            msg.url,
        )
        # The link is not an unsubscribe link: its signature covers another purpose.
        with pytest.raises(InvalidArgument):
            Signer(UNSUBSCRIBE_KEY.encode(), ttl_seconds=60).verify(parse_qs(parts.query)["t"][0])
    for msg in (bare, hostile):
        text, page = _parts(mails[msg.recipient_email])
        assert "/open?" not in text and "/open?" not in page
        assert "javascript:" not in text and "javascript:" not in page


def test_open_links_follow_the_unsubscribe_key_rotation_and_expire() -> None:
    now = [1_800_000_000.0]
    old = Signer(UNSUBSCRIBE_KEY.encode(), ttl_seconds=3600, clock=lambda: now[0])
    token = OpenSigner(old).token("acc", "u1", "n1", "https://app.test/x")
    # Step two of a rotation: the new key is current, the old one still accepted.
    rotated = OpenSigner(
        Signer(OTHER_KEY.encode(), ttl_seconds=3600, clock=lambda: now[0], others=[UNSUBSCRIBE_KEY.encode()])
    )
    assert rotated.verify(token).target == "https://app.test/x"
    # Step three: the old key dropped.
    with pytest.raises(InvalidArgument, match="not valid"):
        OpenSigner(Links(OTHER_KEY.encode(), ttl_seconds=3600)).verify(token)
    checker = OpenSigner(old)
    for bad in (token[:-2] + "é", token.partition(".")[0], "", "a.b"):
        with pytest.raises(InvalidArgument, match="not valid"):
            checker.verify(bad)
    # The unsubscribe links share the verification: a non-ASCII MAC is refused there too (it used to raise TypeError).
    with pytest.raises(InvalidArgument, match="not valid"):
        old.verify(old.token("acc", "u1", "t")[:-2] + "é")
    now[0] += 3601
    with pytest.raises(InvalidArgument, match="expired"):
        checker.verify(token)
