"""One delivery on the email channel: check, cap, compose, hand to SMTP, classify.

Order matters: the cap slot is taken just before the SMTP transaction, so
the cap counts messages handed to SMTP (a delivery sent again after a crash
keeps its slot and is not counted twice).
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from belfry import log, metrics
from belfry.message import Message
from belfry.queue import Drop, Fail, Lease, Outcome, Sent

from services.email import headers, store
from services.email.compose import Composer
from services.email.smtp import SmtpPool, outcome_of

_LOG = log.get(__name__)
DAILY_CAP_REASON = "daily cap"


@dataclass(frozen=True)
class EmailSender:
    """The email channel's ``handle(lease) -> Outcome``."""

    pool: asyncpg.Pool
    smtp: SmtpPool
    composer: Composer
    daily_cap: int

    async def handle(self, lease: Lease) -> Outcome:
        """Send one delivery and say what became of it."""
        try:
            message = Message.from_json(lease.payload)
        except (TypeError, ValueError) as exc:
            return Fail(f"payload is not a message: {exc}")
        to = headers.recipient(message.recipient_email, message.recipient_name)
        if to is None:
            return Fail("the recipient address is missing or not a plain mailbox address")
        # Locked account topics (support, billing) are exempt from the cap.
        if not message.locked and not await store.take_cap_slot(
            self.pool, lease.account_id, lease.delivery_id, to.addr_spec, lease.topic, self.daily_cap
        ):
            metrics.DELIVERIES.labels("email", "dropped").inc()
            return Drop(DAILY_CAP_REASON)
        data = self.composer.compose(lease.delivery_id, message, to)
        try:
            await self.smtp.send(self.composer.sender.addr_spec, [to.addr_spec], data)
        except Exception as exc:
            outcome = outcome_of(exc)
            metrics.DELIVERIES.labels("email", type(outcome).__name__.lower()).inc()
            _LOG.info("smtp refused", delivery_id=lease.delivery_id, outcome=repr(outcome))
            return outcome
        metrics.DELIVERIES.labels("email", "sent").inc()
        return Sent()
