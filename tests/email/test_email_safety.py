"""Untrusted text never adds a header or a recipient; the daily cap holds across racing replicas."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
from belfry import service

from services.email import headers
from services.email.server import build_for
from services.email.settings import load_settings
from tests.email.email_helpers import Capture, email_env, enqueue_messages, message, wait_until_finished

HOSTILE = [
    "Hello\r\nBcc: evil@attacker.test",
    "Hello\nCc: evil@attacker.test",
    "Hello\rTo: evil@attacker.test",
    "=?utf-8?q?Hello=0D=0ABcc:_evil@attacker.test?=",
    "=?utf-8?b?SGVsbG8NCkJjYzogZXZpbEBhdHRhY2tlci50ZXN0?=",  # "Hello\r\nBcc: evil@attacker.test"
    "=?utf-8?q?Hello=00Bcc:_evil@attacker.test?=",  # NUL hidden in an encoded word
    "Hello\u2028Bcc: evil@attacker.test",
]
# jsonb cannot store NUL, so a raw one never reaches a payload; the helper still removes it.
RAW_NUL = "Hello\x00Bcc: evil@attacker.test"


def _header_names(raw: bytes) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    return [line.split(":", 1)[0].lower() for line in head.split("\r\n") if line and not line[0].isspace()]


async def test_hostile_subjects_and_names_add_no_header_or_recipient(
    database_url: str, token_keys: dict[str, bytes], pool: asyncpg.Pool, smtp: tuple[Capture, int], account_id: str
) -> None:
    capture, port = smtp
    msgs = [
        message(account_id, user_id=f"u{i}", title=text, recipient_name=text, recipient_email=f"u{i}@example.test")
        for i, text in enumerate(HOSTILE)
    ]
    bad_address = message(account_id, user_id="x", recipient_email="x@example.test\r\nBcc: evil@attacker.test")
    two_addresses = message(account_id, user_id="y", recipient_email="y@example.test, evil@attacker.test")
    settings = load_settings(email_env(database_url, token_keys, port))
    running = await service.start("email", settings.common, build_for(settings))
    try:
        await enqueue_messages(pool, [*msgs, bad_address, two_addresses])
        rows = await wait_until_finished(pool, account_id, len(msgs) + 2)
    finally:
        await running.stop(0.1)
    states = {r["user_id"]: r["state"] for r in rows}
    assert states.pop("x") == "dead" and states.pop("y") == "dead"
    assert set(states.values()) == {"sent"}
    mine = [c for c in capture.snapshot() if c.rcpt_tos and c.rcpt_tos[0].endswith("@example.test")]
    mine = [c for c in mine if c.rcpt_tos[0] in {m.recipient_email for m in msgs}]
    assert len(mine) == len(msgs)
    for caught in mine:
        assert len(caught.rcpt_tos) == 1 and "attacker" not in caught.rcpt_tos[0]
        names = _header_names(caught.raw)
        assert "bcc" not in names and "cc" not in names
        assert names.count("to") == 1 and names.count("subject") == 1
        parsed = caught.parsed
        assert "attacker" not in parsed["To"].addresses[0].addr_spec
        assert "\n" not in str(parsed["Subject"]) and "\r" not in str(parsed["Subject"])
        assert "Hello" in str(parsed["Subject"])
    assert not any("attacker" in r for c in capture.snapshot() for r in c.rcpt_tos)


def test_header_text_unit_cases() -> None:
    for text in [*HOSTILE, RAW_NUL]:
        cleaned = headers.header_text(text)
        assert not any(ch in cleaned for ch in "\r\n\x00\u2028") and "=?" not in cleaned
    assert headers.recipient("a@b.test, c@d.test") is None
    assert headers.recipient('"a"@b.test') is None
    assert headers.recipient("ok.name+tag@example.test") is not None


async def test_daily_cap_is_atomic_across_two_racing_replicas(
    database_url: str, token_keys: dict[str, bytes], pool: asyncpg.Pool, smtp: tuple[Capture, int], account_id: str
) -> None:
    capture, port = smtp
    cap, total = 5, 40
    address = f"capped-{uuid.uuid4().hex[:8]}@example.test"
    msgs = [message(account_id, user_id=f"u{i}", recipient_email=address) for i in range(total)]
    # A merged-away locked topic is exempt: it must get through even past the cap.
    locked = message(account_id, user_id="locked", recipient_email=address, topic="account.billing", locked=True)
    await enqueue_messages(pool, [*msgs, locked])
    env = email_env(database_url, token_keys, port, BELFRY_EMAIL_DAILY_CAP=str(cap), BELFRY_EMAIL_BATCH="4")
    replicas = []
    for name in ("replica-a", "replica-b"):
        settings = load_settings({**env, "BELFRY_WORKER_ID": name})
        replicas.append(await service.start("email", settings.common, build_for(settings)))
    try:
        rows = await wait_until_finished(pool, account_id, total + 1)
    finally:
        await asyncio.gather(*(r.stop(0.1) for r in replicas))
    states = [r["state"] for r in rows if r["topic"] == "contacts.contact_assigned"]
    assert states.count("sent") == cap and states.count("dropped") == total - cap
    assert {r["errors"][-1]["error"] for r in rows if r["state"] == "dropped"} == {"daily cap"}
    assert [r["state"] for r in rows if r["topic"] == "account.billing"] == ["sent"]
    received = [c for c in capture.snapshot() if c.rcpt_tos == [address]]
    assert len(received) == cap + 1
    # Both replicas took part (the race was real).
    assert len({r["errors"] and r["errors"][-1]["worker"] for r in rows if r["state"] == "dropped"}) == 2
