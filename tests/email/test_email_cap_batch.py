"""The daily cap taken for a whole batch in one round trip keeps the one-at-a-time rules; the sender uses it."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import UTC, datetime, timedelta
from email.headerregistry import Address

import asyncpg
import pytest
from belfry.message import Message
from belfry.queue import Lease
from belfry.unsubscribe import Signer

from services.email.compose import Composer
from services.email.sender import EmailSender
from services.email.settings import SmtpSettings
from services.email.smtp import SmtpPool
from services.email.store import CapRequest, take_cap_slots
from services.email.templates import Templates
from tests.email.email_helpers import UNSUBSCRIBE_KEY, Capture, message

_IDS = itertools.count(10_000_000 + uuid.uuid4().int % 1_000_000_000)


def _requests(account_id: str, address: str, n: int, topic: str = "t.one") -> list[CapRequest]:
    return [CapRequest(account_id, next(_IDS), address, topic) for _ in range(n)]


async def _count(pool: asyncpg.Pool, account_id: str, address: str, topic: str = "t.one") -> int | None:
    value = await pool.fetchval(
        "select sent from email.daily_counts where account_id = $1 and address = $2 and topic = $3",
        account_id,
        address.lower(),
        topic,
    )
    return None if value is None else int(value)


async def _slots(pool: asyncpg.Pool, account_id: str) -> set[int]:
    rows = await pool.fetch("select delivery_id from email.cap_slots where account_id = $1", account_id)
    return {r["delivery_id"] for r in rows}


async def test_a_batch_gets_exactly_the_slots_left_and_refused_ones_leave_no_slot(
    pool: asyncpg.Pool, account_id: str
) -> None:
    batch = _requests(account_id, "a@example.test", 10)
    allowed = await take_cap_slots(pool, batch, 3)
    assert allowed == {r.delivery_id for r in batch[:3]}  # the lowest delivery ids win within a key
    assert await _count(pool, account_id, "a@example.test") == 3
    assert await _slots(pool, account_id) == allowed

    # The same deliveries again (a resend after a crash): the holders keep their slot, nothing is counted twice.
    assert await take_cap_slots(pool, batch, 3) == allowed
    assert await _count(pool, account_id, "a@example.test") == 3
    # Later deliveries find the cap reached.
    assert await take_cap_slots(pool, _requests(account_id, "a@example.test", 2), 3) == set()


async def test_keys_in_one_batch_are_counted_apart(pool: asyncpg.Pool, account_id: str) -> None:
    other_account = f"{account_id}-other"
    a = _requests(account_id, "A@Example.test", 4)  # the address is compared lower-cased
    b = _requests(account_id, "a@example.test", 4)
    c = _requests(account_id, "a@example.test", 4, topic="t.two")
    d = _requests(other_account, "a@example.test", 1)
    allowed = await take_cap_slots(pool, [*d, *c, *b, *a], 5)
    assert allowed == {r.delivery_id for r in [*a, *b[:1], *c, *d]}
    assert await _count(pool, account_id, "a@example.test") == 5
    assert await _count(pool, account_id, "a@example.test", "t.two") == 4
    assert await _count(pool, other_account, "a@example.test") == 1


async def test_a_lowered_cap_grants_nothing_and_keeps_the_count(pool: asyncpg.Pool, account_id: str) -> None:
    assert len(await take_cap_slots(pool, _requests(account_id, "b@example.test", 4), 10)) == 4
    assert await take_cap_slots(pool, _requests(account_id, "b@example.test", 3), 2) == set()
    assert await _count(pool, account_id, "b@example.test") == 4


async def test_racing_batches_share_the_cap_exactly(pool: asyncpg.Pool, account_id: str) -> None:
    cap = 7
    batches = [_requests(account_id, "race@example.test", 5) for _ in range(8)]
    results = await asyncio.gather(*(take_cap_slots(pool, batch, cap) for batch in batches))
    granted = set().union(*results)
    assert len(granted) == cap
    assert await _count(pool, account_id, "race@example.test") == cap
    assert await _slots(pool, account_id) == granted


async def test_an_empty_batch_asks_nothing(pool: asyncpg.Pool) -> None:
    assert await take_cap_slots(pool, [], 5) == set()


def _lease(delivery_id: int, msg: Message) -> Lease:
    return Lease(
        delivery_id=delivery_id,
        account_id=msg.account_id,
        notification_id=uuid.UUID(msg.notification_id),
        user_id=msg.user_id,
        channel="email",
        topic=msg.topic,
        payload=msg.to_json(),
        attempts=1,
        max_attempts=5,
        token=1,
        expires_at=datetime.now(UTC) + timedelta(minutes=1),
    )


@pytest.mark.parametrize("prepared", [True, False])
async def test_the_sender_caps_with_or_without_the_batch_step(
    pool: asyncpg.Pool, account_id: str, smtp: tuple[Capture, int], prepared: bool
) -> None:
    capture, port = smtp
    address = f"sender-{uuid.uuid4().hex[:8]}@example.test"
    settings = SmtpSettings("127.0.0.1", port, "", "", False, False, 5.0, 2)
    composer = Composer(
        Templates(), Signer(UNSUBSCRIBE_KEY.encode(), ttl_seconds=3600), Address("B", "b", "x.test"), "https://x.test"
    )
    sender = EmailSender(pool=pool, smtp=SmtpPool(settings), composer=composer, daily_cap=2)
    leases = [_lease(next(_IDS), message(account_id, user_id=f"u{i}", recipient_email=address)) for i in range(4)]
    locked = message(account_id, user_id="l", recipient_email=address, topic="account.billing", locked=True)
    leases.append(_lease(next(_IDS), locked))
    leases.append(_lease(next(_IDS), message(account_id, recipient_email="not an address")))
    try:
        if prepared:
            await sender.prepare(leases)
        outcomes = [await sender.handle(lease) for lease in leases]
    finally:
        await sender.smtp.close()
    assert [type(o).__name__ for o in outcomes] == ["Sent", "Sent", "Drop", "Drop", "Sent", "Fail"]
    assert len([c for c in capture.snapshot() if c.rcpt_tos == [address]]) == 3
    assert await _count(pool, account_id, address, "contacts.contact_assigned") == 2
