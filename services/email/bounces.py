"""The bounce receiver: an SMTP listener for the reports mail servers send back to VERP addresses.

Only a valid VERP address of this deployment is accepted at RCPT: the token
names an account and a delivery, the delivery's recipient is read from the
queue, and the token's MAC must verify for that recipient. A forged token, a
token of another deployment (other keys or domain) or of a delivery the queue
no longer holds is refused with 550, so nobody can get another account's
addresses suppressed. Each accepted message is read as a report
(``services.email.reports``); what it says about the delivery's recipient is
recorded in ``email.feedback`` (what ``GetDeliveryFeedback`` returns) and:

* a hard bounce (failed, 5.x.x other than 5.7.x) or a complaint (ARF abuse)
  suppresses the address for the delivery's account;
* a soft bounce (delayed, 4.x.x) suppresses it once the address has
  ``soft_limit`` of them within ``soft_window_seconds``;
* a policy bounce (5.7.x) is recorded only.

Mail that is not a report, or is unreadable, is accepted and logged (a
refusal would only make the relay bounce the bounce). aiosmtpd is imported
here only: the module is loaded when the receiver is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass

import asyncpg
from aiosmtpd.smtp import SMTP, Envelope, Session
from belfry import log

from services.email import headers, reports, store
from services.email.settings import BounceSettings
from services.email.verp import Bounce, Verp

_LOG = log.get(__name__)
_MAX_RECIPIENTS = 100  # one report names one VERP address; a relay batching reports stays well under this
_TIMEOUT_SECONDS = 60.0  # an idle client is dropped (aiosmtpd's default is 300 s)
REFUSED = "550 5.1.1 not a bounce address of this sender"
_TRY_LATER = "451 4.3.0 temporary failure, try again later"


@dataclass(frozen=True)
class Target:
    """A verified VERP address: the delivery it names and the recipient that delivery was sent to."""

    bounce: Bounce
    recipient: str  # lower-cased


class BounceHandler:
    """aiosmtpd's handler: verify recipients at RCPT, read and apply the report at DATA."""

    def __init__(self, pool: asyncpg.Pool, verp: Verp, settings: BounceSettings) -> None:
        self._pool = pool
        self._verp = verp
        self._settings = settings

    async def target(self, address: str) -> Target | None:
        """The delivery ``address`` names when its MAC verifies for that delivery's recipient, else None."""
        claim = self._verp.claimed(address)
        if claim is None:
            return None
        row = await self._pool.fetchrow(
            """
            select payload->>'recipient_email' as email from queue.whole_deliveries
            where account_id = $1 and delivery_id = $2 and channel = 'email'
            """,
            claim.account_id,
            claim.delivery_id,
        )
        to = headers.recipient(row["email"] or "") if row is not None else None
        if to is None:
            return None
        # The sender signed ``to.addr_spec`` (services.email.sender): the same address is verified here.
        verified = self._verp.verify(address, to.addr_spec)
        return Target(verified, to.addr_spec.lower()) if verified is not None else None

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        """Accept only this deployment's VERP addresses whose MAC verifies."""
        if len(envelope.rcpt_tos) >= _MAX_RECIPIENTS:
            return "452 4.5.3 too many recipients"
        try:
            found = await self.target(address)
        except Exception as exc:
            # 4xx, never an exception (aiosmtpd would answer 500, a permanent failure): the relay keeps
            # the report and tries again, so a database outage loses no bounce.
            _LOG.warning("bounce receiver: could not check a recipient", error=repr(exc))
            return _TRY_LATER
        if found is None:
            _LOG.warning("bounce receiver: refused recipient", address=address[:320], peer=str(session.peer))
            return REFUSED
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802 - aiosmtpd's hook name
        """Read the report and apply it to each accepted recipient's delivery."""
        raw = envelope.original_content or envelope.content or b""
        data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogateescape")
        try:
            # Parsing up to max_bytes is CPU work: off the event loop, which also serves gRPC and the sender.
            findings = await asyncio.to_thread(reports.read, data)
        except Exception as exc:  # the email package is lenient, but a hostile message must never crash the listener
            _LOG.warning("bounce receiver: unreadable message ignored", error=repr(exc), size=len(data))
            return "250 2.0.0 accepted"
        if findings is None:
            _LOG.warning("bounce receiver: not a delivery status or feedback report; ignored", size=len(data))
            return "250 2.0.0 accepted"
        if not findings:
            # A report we could not read a failure or complaint from (damaged, or a success notice).
            _LOG.warning("bounce receiver: report without a failure or complaint; ignored", size=len(data))
            return "250 2.0.0 accepted"
        try:
            for address in envelope.rcpt_tos:
                found = await self.target(address)
                if found is not None:
                    await self.apply(found, findings)
        except Exception as exc:
            # As at RCPT: the relay sends it again. A report half applied before the failure is applied
            # again then; suppressing twice is idempotent, a soft bounce may be counted twice.
            _LOG.warning("bounce receiver: could not apply a report", error=repr(exc))
            return _TRY_LATER
        return "250 2.0.0 accepted"

    async def apply(self, target: Target, findings: list[reports.Finding]) -> None:
        """Record what the report says about the target's recipient; suppress when it says so."""
        account_id, delivery_id = target.bounce.account_id, target.bounce.delivery_id
        # The MAC vouches for one recipient: a report about any other address is not ours to act on.
        # A complaint without Original-Rcpt-To is about the VERP address's recipient.
        ours = [f for f in findings if not f.addresses or target.recipient in f.addresses]
        if not ours:
            _LOG.warning(
                "bounce receiver: report names another recipient; ignored",
                delivery_id=delivery_id,
                named=sorted({a for f in findings for a in f.addresses})[:10],
            )
            return
        # One report is one event for the recipient: a report repeating its block cannot count
        # several soft bounces (the VERP address was sent to one recipient, once).
        finding = ours[0]
        count = await store.record_feedback(
            self._pool,
            store.NewFeedback(account_id, delivery_id, finding.kind, target.recipient, finding.status, finding.detail),
            window_seconds=self._settings.soft_window_seconds,
        )
        reason = {reports.HARD: store.HARD_BOUNCE, reports.COMPLAINT: store.COMPLAINT}.get(finding.kind)
        if finding.kind == reports.SOFT and count >= self._settings.soft_limit:
            reason = store.SOFT_BOUNCES
        detail = f"{finding.status} {finding.detail}" if finding.detail != finding.status else finding.status
        if reason is not None:
            await store.suppress(self._pool, account_id, target.recipient, reason, detail, delivery_id)
        _LOG.info(
            "bounce received", delivery_id=delivery_id, kind=finding.kind, status=finding.status, suppressed=reason
        )


class BounceReceiver:
    """The listening socket and its server; ``port`` is the bound port once ``start`` returned."""

    def __init__(self, pool: asyncpg.Pool, verp: Verp, settings: BounceSettings, *, shared: bool) -> None:
        self.handler = BounceHandler(pool, verp, settings)
        self._settings = settings
        self._shared = shared  # one of a pod's workers: the parent reserved the port, all workers bind it
        self._server: asyncio.Server | None = None
        self.port = 0

    def _protocol(self) -> SMTP:
        return SMTP(
            self.handler,
            data_size_limit=self._settings.max_bytes,  # advertised as SIZE; a larger message gets 552
            # Given explicitly: aiosmtpd's default is socket.getfqdn(), a DNS lookup on the event loop.
            hostname=self._settings.hostname,
            ident="Belfry bounce receiver",
            timeout=_TIMEOUT_SECONDS,
        )

    async def start(self) -> int:
        """Bind and listen; the bound port (logged, as the gRPC port is)."""
        host = self._settings.host or "0.0.0.0"  # noqa: S104 - the bounce relay reaches the pod from outside
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # ``[::]`` takes IPv4 too (relays reach the pod over either), as the pod's parent reserves it.
        dual = host == "::" and socket.has_dualstack_ipv6()
        sock = socket.create_server(
            (host, self._settings.port), family=family, reuse_port=self._shared, dualstack_ipv6=dual
        )
        try:
            self._server = await asyncio.get_running_loop().create_server(self._protocol, sock=sock)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        _LOG.info("bounce receiver listening", port=self.port)
        return self.port

    async def close(self) -> None:
        """Stop accepting; sessions in progress are cut (the relay retries what it did not finish)."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
