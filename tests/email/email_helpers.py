"""Helpers shared by the email tests: deliveries, settings, waiting on the database."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import signal
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import asyncpg
from belfry import rpc
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.message import Item, Message
from belfry.queue import NewDelivery, enqueue

from tests.conftest import client_tls, common_env

UNSUBSCRIBE_KEY = "unsubscribe-key-for-tests-only-0123456789"


@dataclass
class Caught:
    """One accepted SMTP transaction."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes

    @property
    def parsed(self) -> EmailMessage:
        """The message as a mail client would read it."""
        parsed = email.message_from_bytes(self.raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class Capture:
    """The handler: refuses some recipients on purpose, records the rest."""

    caught: list[Caught] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    on_accept: Callable[[Caught], int | None] | None = None  # returns a pid to SIGKILL after the 250

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:  # noqa: N802 - aiosmtpd's hook name
        """``tempfail*`` addresses get a 4xx reply, ``reject*`` a 5.1.1 one (no such mailbox), ``policy*`` a 5.7.1 one."""
        if address.startswith("tempfail"):
            return "451 4.3.0 mailbox busy, try again later"
        if address.startswith("reject"):
            return "550 5.1.1 no such mailbox here"
        if address.startswith("policy"):
            return "550 5.7.1 refused by local policy"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's hook name
        """Keep the raw bytes exactly as received."""
        item = Caught(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content or envelope.content)
        with self.lock:
            self.caught.append(item)
        victim = self.on_accept(item) if self.on_accept is not None else None
        if victim is not None:
            # The worst moment: "250 accepted" is on its way and the sender has not recorded it.
            # SIGSTOP first: a pending stop runs before any more of the sender's code (this thread
            # may lose the GIL between the reply and the kill), so it cannot record the send.
            os.kill(victim, signal.SIGSTOP)
            await server.push("250 2.0.0 accepted")
            os.kill(victim, signal.SIGKILL)
        return "250 2.0.0 accepted"

    def snapshot(self) -> list[Caught]:
        """What has been accepted so far."""
        with self.lock:
            return list(self.caught)


def email_env(database_url: str, token_keys: dict[str, bytes], port: int, **extra: str) -> dict[str, str]:
    """The email service's environment pointing at the capture server."""
    return common_env(
        database_url,
        token_keys,
        identity="email",
        BELFRY_SMTP_HOST="127.0.0.1",
        BELFRY_SMTP_PORT=str(port),
        BELFRY_EMAIL_FROM="Belfry <notify@belfry.test>",
        BELFRY_PUBLIC_URL="https://app.belfry.test",
        BELFRY_UNSUBSCRIBE_KEY=UNSUBSCRIBE_KEY,
        BELFRY_SMTP_TIMEOUT="5",
        **extra,
    )


def message(account_id: str, user_id: str = "u1", **fields: Any) -> Message:
    """A message with sensible defaults; ``fields`` override them."""
    base: dict[str, Any] = {
        "notification_id": str(uuid.uuid4()),
        "account_id": account_id,
        "user_id": user_id,
        "topic": "contacts.contact_assigned",
        "title": "Contact 42 was assigned to you",
        "body": "Ana assigned Contact 42 to you.",
        "url": "https://app.belfry.test/contacts/42",
        "occurred_at": datetime.now(UTC).isoformat(),
        "recipient_email": f"{user_id}@example.test",
        "recipient_name": "Ana Tester",
    }
    base.update(fields)
    return Message(**base)


async def enqueue_messages(pool: asyncpg.Pool, messages: list[Message]) -> list[uuid.UUID]:
    """Put email deliveries for ``messages`` on the queue; return their notification ids."""
    rows = [
        NewDelivery(
            account_id=m.account_id,
            notification_id=uuid.UUID(m.notification_id),
            user_id=m.user_id,
            channel="email",
            topic=m.topic,
            payload=m.to_json(),
            expires_at=datetime.now(UTC) + timedelta(hours=1),
        )
        for m in messages
    ]
    async with pool.acquire() as conn, conn.transaction():
        await enqueue(conn, rows)
    return [r.notification_id for r in rows]


async def wait_until_finished(
    pool: asyncpg.Pool,
    account_id: str,
    count: int,
    *,
    states: tuple[str, ...] = ("sent", "dead", "dropped", "expired"),
    within: float = 30.0,
) -> list[asyncpg.Record]:
    """Wait (polling the database every 20 ms) until ``count`` of the account's email deliveries are in ``states``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        rows = await pool.fetch(
            "select * from queue.whole_deliveries where account_id = $1 and channel = 'email' and state = any($2::text[])",
            account_id,
            list(states),
        )
        if len(rows) >= count or loop.time() > deadline:
            return rows
        await asyncio.sleep(0.02)


def items(n: int) -> tuple[Item, ...]:
    """``n`` merged objects."""
    return tuple(Item("contact", str(i), f"Contact {i}", f"https://app.belfry.test/contacts/{i}") for i in range(n))


async def seed(address: str, account_id: str, **users: tuple[bool, bool]) -> None:
    """The account and its users, each ``name=(super_admin, active)``."""
    channel = rpc.connect(address, client_tls())
    stub = directory_pb2_grpc.DirectoryServiceStub(channel)
    account = directory_pb2.Account(account_id=account_id, name="Acme", tier=directory_pb2.TIER_ENTERPRISE)
    await stub.UpsertAccount(directory_pb2.UpsertAccountRequest(account=account))
    for user_id, (super_admin, active) in users.items():
        user = directory_pb2.User(
            account_id=account_id,
            user_id=user_id,
            email=f"{user_id}@example.test",
            display_name=user_id,
            locale="en",
            time_zone="UTC",
            permission_set="sales",
            super_admin=super_admin,
            active=active,
        )
        await stub.UpsertUser(directory_pb2.UpsertUserRequest(user=user))
    await channel.close()
