"""A pool of reused SMTP connections, and what each SMTP failure means for the queue.

Opening a connection costs a TCP handshake, the greeting, EHLO, maybe TLS and
AUTH: several round trips per message. The pool keeps up to ``size``
connections open and hands each to one transaction at a time. A connection
that failed in any way is closed rather than reused (its state is unknown).
When the server advertises PIPELINING (RFC 2920) a transaction takes two
round trips instead of four (``pipelining.send_pipelined``); otherwise
aiosmtplib's ``sendmail`` sends one command at a time.
"""

from __future__ import annotations

import asyncio
import ssl

import aiosmtplib
from belfry.queue import Fail, Outcome, Retry

from services.email.pipelining import send_pipelined
from services.email.settings import SmtpSettings


class SmtpPool:
    """Up to ``size`` live connections, each used by one transaction at a time."""

    def __init__(
        self, settings: SmtpSettings, *, tls_context: ssl.SSLContext | None = None, pipelining: bool = True
    ) -> None:
        self._settings = settings
        self._pipelining = pipelining  # False only to measure the plain path against a pipelining server
        if tls_context is None and settings.ca_file is not None:
            tls_context = ssl.create_default_context(cafile=str(settings.ca_file))
        self._tls = tls_context
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(settings.pool_size)
        self.opened = 0  # connections opened so far (for tests and benchmarks)
        self.pipelined = 0  # transactions sent with PIPELINING (for tests and benchmarks)

    async def _open(self) -> aiosmtplib.SMTP:
        s = self._settings
        client = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            use_tls=s.implicit_tls,
            start_tls=s.starttls,
            username=s.user or None,
            password=s.password or None,
            timeout=s.timeout,
            tls_context=self._tls,
        )
        await client.connect()
        try:
            if client.is_ehlo_or_helo_needed:
                # Now rather than at the first MAIL: the extensions decide how to send.
                try:
                    await client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await client.helo()
        except BaseException:
            client.close()
            raise
        self.opened += 1
        return client

    async def send(self, sender: str, recipients: list[str], message: bytes) -> None:
        """Hand one message over; raises aiosmtplib / OS errors (see ``outcome_of``)."""
        async with self._slots:
            client = self._idle.pop() if self._idle else await self._open()
            try:
                if self._pipelining and client.supports_extension("pipelining"):
                    await send_pipelined(client, sender, recipients, message, self._settings.timeout)
                    self.pipelined += 1
                else:
                    await client.sendmail(sender, recipients, message)
            except BaseException:
                client.close()
                raise
            self._idle.append(client)

    async def close(self) -> None:
        """Say QUIT on every idle connection."""
        idle, self._idle = self._idle, []
        for client in idle:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()


def outcome_of(exc: BaseException) -> Outcome:
    """4xx → retry; 5xx → permanent failure with the server's reply; dropped or slow → retry."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        refused = exc.recipients[0]
        return _by_code(refused.code, refused.message)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _by_code(exc.code, exc.message)
    if isinstance(exc, aiosmtplib.SMTPException | OSError | TimeoutError):
        # Disconnects, timeouts, refused connections: the server may be back soon.
        return Retry(f"smtp connection: {type(exc).__name__}: {exc}")
    raise exc


def _by_code(code: int, message: str) -> Outcome:
    reply = f"{code} {message}".strip()
    if 400 <= code < 500:
        return Retry(f"smtp {reply}")
    if code >= 500:
        return Fail(f"smtp {reply}")
    return Retry(f"smtp unexpected reply {reply}")
