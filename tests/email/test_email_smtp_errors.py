"""Connection-level SMTP failures are retried, never recorded as permanent."""

from __future__ import annotations

import asyncio
import socket

import aiosmtplib
import pytest
from belfry.queue import Retry

from services.email.settings import SmtpSettings
from services.email.smtp import SmtpPool, outcome_of


def _settings(port: int) -> SmtpSettings:
    return SmtpSettings("127.0.0.1", port, "", "", False, False, 5.0, 2)


async def test_dropped_connection_and_refused_connection_are_retried() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Greets, then drops the connection in the middle of the transaction.
        writer.write(b"220 flaky.test ESMTP\r\n")
        await writer.drain()
        await reader.readline()
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = SmtpPool(_settings(port))
    try:
        with pytest.raises((aiosmtplib.SMTPException, OSError)) as dropped:
            await pool.send("a@b.test", ["c@d.test"], b"Subject: x\r\n\r\nhi\r\n")
        outcome = outcome_of(dropped.value)
        assert isinstance(outcome, Retry) and "connection" in outcome.error
    finally:
        server.close()
        await server.wait_closed()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with pytest.raises((aiosmtplib.SMTPException, OSError)) as refused:
        await SmtpPool(_settings(closed)).send("a@b.test", ["c@d.test"], b"Subject: x\r\n\r\nhi\r\n")
    assert isinstance(outcome_of(refused.value), Retry)
