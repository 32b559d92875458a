"""The email channel: check, cap, compose, hand to SMTP, classify.

The daily-cap slots of a whole claimed batch are taken in one round trip
(``prepare``) before any of its messages is sent, so the cap still counts
messages handed to SMTP (a delivery sent again after a crash keeps its slot
and is not counted twice) without a transaction per message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from email.headerregistry import Address

import asyncpg
from belfry import log
from belfry.message import Message
from belfry.queue import Drop, Fail, Lease, Outcome, Sent

from services.email import headers, store
from services.email.compose import Composer
from services.email.smtp import SmtpPool, outcome_of

_LOG = log.get(__name__)
DAILY_CAP_REASON = "daily cap"


def _parsed(lease: Lease) -> tuple[Message, Address] | Fail:
    try:
        message = Message.from_json(lease.payload)
    except (TypeError, ValueError) as exc:
        return Fail(f"payload is not a message: {exc}")
    to = headers.recipient(message.recipient_email, message.recipient_name)
    if to is None:
        return Fail("the recipient address is missing or not a plain mailbox address")
    return message, to


@dataclass(frozen=True)
class EmailSender:
    """The email channel's ``prepare(leases)`` and ``handle(lease) -> Outcome``."""

    pool: asyncpg.Pool
    smtp: SmtpPool
    composer: Composer
    daily_cap: int
    # What ``prepare`` learnt per (delivery id, lease token): the parsed
    # message and recipient, and the cap decision (None: exempt). Each entry
    # is used once by ``handle``.
    _prepared: dict[tuple[int, int], tuple[Message, Address, bool | None]] = field(
        default_factory=dict, compare=False, repr=False
    )

    async def prepare(self, leases: list[Lease]) -> None:
        """Take the daily-cap slots of a claimed batch in one round trip."""
        parsed = {lease.delivery_id: (lease, _parsed(lease)) for lease in leases}
        requests = [
            store.CapRequest(lease.account_id, lease.delivery_id, p[1].addr_spec, lease.topic)
            for lease, p in parsed.values()
            # Locked account topics (support, billing) are exempt from the cap.
            if not isinstance(p, Fail) and not p[0].locked
        ]
        allowed = await store.take_cap_slots(self.pool, requests, self.daily_cap)
        for delivery_id, (lease, p) in parsed.items():
            if not isinstance(p, Fail):
                self._prepared[delivery_id, lease.token] = (p[0], p[1], None if p[0].locked else delivery_id in allowed)

    async def _may_send(self, lease: Lease, to: Address) -> bool:
        # Not prepared (the batch step failed, or a caller without one): ask alone.
        request = store.CapRequest(lease.account_id, lease.delivery_id, to.addr_spec, lease.topic)
        return lease.delivery_id in await store.take_cap_slots(self.pool, [request], self.daily_cap)

    async def handle(self, lease: Lease) -> Outcome:
        """Send one delivery and say what became of it."""
        prepared = self._prepared.pop((lease.delivery_id, lease.token), None)
        if prepared is not None:
            message, to, allowed = prepared
        else:
            parsed = _parsed(lease)
            if isinstance(parsed, Fail):
                return parsed
            message, to = parsed
            allowed = None if message.locked else await self._may_send(lease, to)
        if allowed is False:
            return Drop(DAILY_CAP_REASON)
        data = self.composer.compose(lease.delivery_id, message, to)
        try:
            await self.smtp.send(self.composer.sender.addr_spec, [to.addr_spec], data)
        except Exception as exc:
            outcome = outcome_of(exc)
            _LOG.info("smtp refused", delivery_id=lease.delivery_id, outcome=repr(outcome))
            return outcome
        return Sent()
