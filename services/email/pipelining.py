"""One SMTP transaction with PIPELINING (RFC 2920) on an aiosmtplib connection.

aiosmtplib sends MAIL, each RCPT and DATA one at a time, waiting for every
reply: four round trips per message. When the server advertises PIPELINING,
``send_pipelined`` writes MAIL FROM, RCPT TO and DATA in one write, reads
their replies, then sends the body: two round trips. aiosmtplib's reply
reader hands over one reply per chunk received (a server answering three
pipelined commands in one segment would leave two unread), so for the
transaction the connection's transport is lent to ``_Replies`` through
asyncio's public ``transport.set_protocol`` and given back afterwards.
Connecting, EHLO, STARTTLS and AUTH stay aiosmtplib's.

Failures raise aiosmtplib's own exceptions, so ``smtp.outcome_of`` maps
them as for the plain path (4xx retry, 5xx permanent, disconnect retry).
"""

from __future__ import annotations

import asyncio
import collections
import re
from typing import cast

import aiosmtplib
from aiosmtplib.email import quote_address

_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"(?m)^\.")
_MAX_REPLY = 64 * 1024
# A plain dot-atom mailbox needs no parsing to be quoted (and cannot inject:
# no spaces, brackets or control characters).
_PLAIN_MAILBOX = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+")


class _Replies(asyncio.Protocol):
    """Collects every complete SMTP reply the server sends while it holds the transport."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._replies: collections.deque[aiosmtplib.SMTPResponse] = collections.deque()
        self._failure: aiosmtplib.SMTPException | None = None
        self._wake = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        """Parse as many complete (possibly multi-line) replies as arrived."""
        self._buffer.extend(data)
        lines: list[bytes] = []
        start = 0
        while (end := self._buffer.find(b"\n", start)) != -1:
            line = bytes(self._buffer[start : end + 1]).rstrip(b"\r\n")
            start = end + 1
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                self._fail(aiosmtplib.SMTPResponseException(-1, f"malformed SMTP reply line {line[:80]!r}"))
                return
            lines.append(line)
            if line[3:4] != b"-":  # the last line of a reply
                text = "\n".join(part[4:].decode("utf-8", "surrogateescape").strip() for part in lines)
                self._replies.append(aiosmtplib.SMTPResponse(int(line[:3]), text))
                lines = []
                del self._buffer[:start]
                start = 0
        if len(self._buffer) > _MAX_REPLY:
            self._fail(aiosmtplib.SMTPResponseException(-1, "SMTP reply too long"))
        self._wake.set()

    def eof_received(self) -> bool:
        """The server closed its side mid-transaction."""
        self._fail(aiosmtplib.SMTPServerDisconnected("the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection dropped mid-transaction."""
        self._fail(aiosmtplib.SMTPServerDisconnected(f"connection lost: {exc}" if exc else "connection lost"))

    def _fail(self, failure: aiosmtplib.SMTPException) -> None:
        if self._failure is None:
            self._failure = failure
        self._wake.set()

    async def next(self, seconds: float | None) -> aiosmtplib.SMTPResponse:
        """The next reply, in order; raises if the connection failed first or the wait timed out."""
        while not self._replies:
            if self._failure is not None:
                raise self._failure
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), seconds)
            except TimeoutError as exc:
                raise aiosmtplib.SMTPReadTimeoutError("timed out waiting for the SMTP server's reply") from exc
        return self._replies.popleft()


def _quoted(address: str) -> bytes:
    if _PLAIN_MAILBOX.fullmatch(address):
        return b"<" + address.encode("ascii") + b">"
    return quote_address(address).encode("ascii")


def _command(*parts: bytes) -> bytes:
    line = b" ".join(parts)
    if any(c < 0x20 or c == 0x7F for c in line):
        raise ValueError("an SMTP command argument contains a control character")
    return line + b"\r\n"


def dot_stuffed(message: bytes) -> bytes:
    """The DATA payload: CRLF line ends, leading dots doubled, ended by ``.`` alone (RFC 5321 §4.5.2)."""
    body = message
    # Fast paths: composed messages already have CRLF line ends and no line
    # starting with a dot; counting bytes is far cheaper than a regex pass.
    crlf = body.count(b"\r\n")
    if body.count(b"\r") != crlf or body.count(b"\n") != crlf:
        body = _LINE_ENDS.sub(b"\r\n", body)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    if body.startswith(b".") or b"\n." in body:
        body = _LEADING_DOT.sub(b"..", body)
    return body + b".\r\n"


async def send_pipelined(
    client: aiosmtplib.SMTP, sender: str, recipients: list[str], message: bytes, reply_seconds: float | None
) -> None:
    """One pipelined transaction; raises like ``aiosmtplib.SMTP.sendmail`` on any refusal.

    ``reply_seconds`` bounds the wait for each reply. The caller owns
    ``client`` for the whole transaction and closes it after any exception
    (its state is then unknown).
    """
    protocol = client.protocol
    # uvloop's transports are not asyncio.Transport subclasses, hence the cast, not isinstance.
    transport = cast(asyncio.Transport | None, protocol.transport if protocol is not None else None)
    if protocol is None or transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("not connected")
    payload = dot_stuffed(message)
    mail = [b"MAIL", b"FROM:" + _quoted(sender)]
    if client.supports_extension("size"):
        mail.append(f"SIZE={len(payload) - 3}".encode("ascii"))  # RFC 1870: without the final ".\r\n"
    commands = _command(*mail)
    commands += b"".join(_command(b"RCPT", b"TO:" + _quoted(r)) for r in recipients)
    commands += b"DATA\r\n"

    replies = _Replies()
    transport.set_protocol(replies)
    try:
        transport.write(commands)
        mail_reply = await replies.next(reply_seconds)
        refused = []
        for recipient in recipients:
            reply = await replies.next(reply_seconds)
            if reply.code not in (250, 251):
                refused.append(aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, recipient))
        data_reply = await replies.next(reply_seconds)
        failure: aiosmtplib.SMTPException | None = None
        if mail_reply.code != 250:
            failure = aiosmtplib.SMTPSenderRefused(mail_reply.code, mail_reply.message, sender)
        elif len(refused) == len(recipients):
            failure = aiosmtplib.SMTPRecipientsRefused(refused)
        elif data_reply.code != 354:
            failure = aiosmtplib.SMTPDataError(data_reply.code, data_reply.message)
        if failure is not None:
            if data_reply.code == 354:
                # RFC 2920 §3.1: DATA was accepted although the envelope was not;
                # end the empty message so the server leaves the data phase.
                transport.write(b".\r\n")
                await replies.next(reply_seconds)
            raise failure
        transport.write(payload)
        final = await replies.next(reply_seconds)
        if final.code != 250:
            raise aiosmtplib.SMTPDataError(final.code, final.message)
    finally:
        if not transport.is_closing():
            transport.set_protocol(protocol)
