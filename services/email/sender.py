"""The email channel: check, cap, compose, hand to SMTP, classify.

The daily-cap slots of a whole claimed batch are taken in one round trip
(``prepare``) before any of its messages is sent, so the cap still counts
messages handed to SMTP (a delivery sent again after a crash keeps its slot
and is not counted twice) without a transaction per message. The same round
trip's neighbour asks which recipients are suppressed: those deliveries are
dropped with reason "address suppressed" before any SMTP traffic (and take no
cap slot). A 5.1.x reply at RCPT (the mailbox does not exist) suppresses the
address with the server's reply; 5.7.x (policy) and 4xx replies never do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.headerregistry import Address

import aiosmtplib
import asyncpg
from belfry import log
from belfry.message import Message
from belfry.queue import Drop, Fail, Lease, Outcome, Sent

from services.email import headers, store
from services.email.branding import BrandingCache
from services.email.compose import Composer
from services.email.smtp import SmtpPool, outcome_of
from services.email.verp import Verp

_LOG = log.get(__name__)
DAILY_CAP_REASON = "daily cap"
SUPPRESSED_REASON = "address suppressed"
# RFC 3463 X.1.Y: addressing status (bad mailbox, bad domain, moved). 5.1.x is
# permanent: that address will not work tomorrow either.
_MAILBOX_GONE = re.compile(r"\s*5\.1\.\d{1,3}\b")


def mailbox_gone(exc: BaseException) -> str | None:
    """The server's reply when ``exc`` is a 5xx 5.1.x refusal at RCPT, else None."""
    if not isinstance(exc, aiosmtplib.SMTPRecipientsRefused) or not exc.recipients:
        return None
    refused = exc.recipients[0]
    if 500 <= refused.code < 600 and _MAILBOX_GONE.match(refused.message):
        return f"{refused.code} {refused.message}".strip()
    return None


def applies(reason: str, locked: bool) -> bool:
    """Whether a suppression stops this message: a complaint does not stop locked topics (support, billing)."""
    return not (locked and reason == store.COMPLAINT)


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
    soft_expiry_seconds: float = 7 * 86400.0  # a soft-bounce suppression lapses after this
    verp: Verp | None = None  # per-delivery envelope senders, so bounces name their delivery
    branding: BrandingCache | None = None  # the accounts' From, Reply-To and look (None: the defaults for all)
    # What ``prepare`` learnt per (delivery id, lease token): the parsed
    # message and recipient, and the cap decision (None: exempt; a string:
    # the suppression reason). Each entry is used once by ``handle``.
    _prepared: dict[tuple[int, int], tuple[Message, Address, bool | str | None]] = field(
        default_factory=dict, compare=False, repr=False
    )

    async def prepare(self, leases: list[Lease]) -> None:
        """Find the batch's suppressed recipients, then take the others' daily-cap slots (a round trip each)."""
        parsed = {lease.delivery_id: (lease, p) for lease in leases if not isinstance(p := _parsed(lease), Fail)}
        if self.branding is not None:
            # The batch's accounts not cached yet, in one query: ``handle`` then asks nothing per message.
            await self.branding.warm({lease.account_id for lease, _ in parsed.values()})
        found = await store.suppressed(
            self.pool,
            [(lease.account_id, p[1].addr_spec) for lease, p in parsed.values()],
            soft_expiry_seconds=self.soft_expiry_seconds,
        )
        stopped: dict[int, str] = {}
        for delivery_id, (lease, p) in parsed.items():
            reason = found.get((lease.account_id, p[1].addr_spec))
            if reason is not None and applies(reason, p[0].locked):
                stopped[delivery_id] = reason
        requests = [
            store.CapRequest(lease.account_id, lease.delivery_id, p[1].addr_spec, lease.topic)
            for lease, p in parsed.values()
            # Locked account topics (support, billing) are exempt from the cap.
            if not p[0].locked and lease.delivery_id not in stopped
        ]
        allowed = await store.take_cap_slots(self.pool, requests, self.daily_cap)
        for delivery_id, (lease, p) in parsed.items():
            decision = stopped.get(delivery_id) or (None if p[0].locked else delivery_id in allowed)
            self._prepared[delivery_id, lease.token] = (p[0], p[1], decision)

    async def _suppression(self, lease: Lease, message: Message, to: Address) -> str | None:
        found = await store.suppressed(
            self.pool, [(lease.account_id, to.addr_spec)], soft_expiry_seconds=self.soft_expiry_seconds
        )
        reason = found.get((lease.account_id, to.addr_spec))
        return reason if reason is not None and applies(reason, message.locked) else None

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
            allowed = await self._suppression(lease, message, to)
            if allowed is None and not message.locked:
                allowed = await self._may_send(lease, to)
        if isinstance(allowed, str):
            return Drop(f"{SUPPRESSED_REASON} ({allowed})")
        if allowed is False:
            return Drop(DAILY_CAP_REASON)
        branding = await self.branding.get(lease.account_id) if self.branding is not None else None
        data = self.composer.compose(lease.delivery_id, message, to, branding)
        try:
            envelope = (
                self.verp.address(lease.account_id, lease.delivery_id, to.addr_spec)
                if self.verp is not None
                else self.composer.sender.addr_spec
            )
            await self.smtp.send(envelope, [to.addr_spec], data)
        except Exception as exc:
            outcome = outcome_of(exc)
            _LOG.info("smtp refused", delivery_id=lease.delivery_id, outcome=repr(outcome))
            reply = mailbox_gone(exc)
            if reply is not None:
                await store.suppress(
                    self.pool, lease.account_id, to.addr_spec, store.HARD_BOUNCE, reply, lease.delivery_id
                )
            return outcome
        return Sent()
