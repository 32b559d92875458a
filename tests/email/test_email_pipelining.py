"""SMTP PIPELINING (RFC 2920): one write for MAIL + RCPT + DATA when advertised, one at a time otherwise.

aiosmtpd does not advertise PIPELINING, so the pipelined path is tested
against a small real SMTP server on a socket (``PipeServer``) that records
which commands arrived in each read and answers all commands of a read in one
write, as pipelining servers do; the fallback is tested against both.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import uvloop
from belfry.queue import Fail, Retry

from services.email.pipelining import dot_stuffed
from services.email.settings import SmtpSettings
from services.email.smtp import SmtpPool, outcome_of
from tests.email.email_helpers import Capture

MESSAGE = b"Subject: hi\r\n\r\nfirst line\r\n.a line that starts with a dot\r\n..two dots\r\nlast\r\n"


class PipeServer:
    """A minimal SMTP server with configurable replies per stage (MAIL, RCPT, DATA, END)."""

    def __init__(
        self,
        *,
        pipelining: bool = True,
        replies: dict[str, bytes] | None = None,
        drop_at: str = "",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.tls = tls
        self.pipelining = pipelining
        self.replies = {"MAIL": b"250 ok", "RCPT": b"250 ok", "DATA": b"354 go on", "END": b"250 queued"}
        self.replies.update(replies or {})
        self.drop_at = drop_at
        self.reads: list[list[str]] = []  # the command verbs found in each read from the socket
        self.messages: list[bytes] = []  # raw DATA payloads, dot-stuffing undone
        self.commands: list[bytes] = []  # every command line, in order
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def _answer(self, verb: str) -> bytes:
        if verb == "EHLO":
            ext = b"250-PIPELINING\r\n" if self.pipelining else b""
            return b"250-pipe.test\r\n" + ext + b"250 SIZE 10000000"
        return self.replies.get(verb, b"250 ok")

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 pipe.test ESMTP\r\n")
        buffer, in_data = b"", False
        try:
            while chunk := await reader.read(65536):
                buffer += chunk
                out: list[bytes] = []
                verbs: list[str] = []
                while True:
                    if in_data:
                        end = buffer.find(b"\r\n.\r\n")
                        if end == -1 and buffer != b".\r\n":
                            break
                        payload, buffer = (b"", buffer[3:]) if end == -1 else (buffer[: end + 2], buffer[end + 5 :])
                        self.messages.append(payload.replace(b"\r\n..", b"\r\n.").removeprefix(b"."))
                        verbs.append("END")
                        out.append(self.replies["END"])
                        in_data = False
                        continue
                    line, sep, rest = buffer.partition(b"\r\n")
                    if not sep:
                        break
                    buffer = rest
                    self.commands.append(line)
                    verb = line.split(b" ", 1)[0].upper().decode()
                    verbs.append(verb)
                    if verb == self.drop_at:
                        writer.close()
                        return
                    if verb == "QUIT":
                        writer.write(b"221 bye\r\n")
                        return
                    reply = self._answer(verb)
                    out.append(reply)
                    in_data = verb == "DATA" and reply.startswith(b"354")
                self.reads.append(verbs)
                if out:
                    writer.write(b"".join(reply + b"\r\n" for reply in out))  # every reply of this read at once
        except ConnectionError:
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[PipeServer]:
    """A started ``PipeServer``, stopped on exit."""
    server = PipeServer(**options)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _pool(port: int, *, ca_file: Path | None = None) -> SmtpPool:
    settings = SmtpSettings(
        host="127.0.0.1",
        port=port,
        user="",
        password="",
        starttls=False,
        implicit_tls=ca_file is not None,
        timeout=5,
        pool_size=2,
        ca_file=ca_file,
    )
    return SmtpPool(settings)


async def test_advertised_pipelining_sends_the_envelope_in_one_write() -> None:
    async with serving() as pipe_server:
        pool = _pool(pipe_server.port)
        try:
            await pool.send("from@example.test", ["to@example.test"], MESSAGE)
            await pool.send("from@example.test", ["to@example.test"], MESSAGE)
        finally:
            await pool.close()
    assert pool.pipelined == 2 and pool.opened == 1
    assert pipe_server.reads.count(["MAIL", "RCPT", "DATA"]) == 2
    assert pipe_server.messages == [MESSAGE, MESSAGE]  # dot-stuffed on the way, intact on arrival


async def test_without_pipelining_commands_go_one_at_a_time() -> None:
    async with serving(pipelining=False) as pipe_server:
        pool = _pool(pipe_server.port)
        try:
            await pool.send("from@example.test", ["to@example.test"], MESSAGE)
        finally:
            await pool.close()
    assert pool.pipelined == 0
    assert ["MAIL"] in pipe_server.reads and ["RCPT"] in pipe_server.reads and ["DATA"] in pipe_server.reads
    assert pipe_server.messages == [MESSAGE]


async def test_aiosmtpd_does_not_advertise_pipelining_and_gets_the_plain_path(smtp: tuple[Capture, int]) -> None:
    capture, port = smtp
    pool = _pool(port)
    try:
        await pool.send("from@example.test", ["plain@example.test"], MESSAGE)
    finally:
        await pool.close()
    assert pool.pipelined == 0
    assert [c.rcpt_tos for c in capture.snapshot()] == [["plain@example.test"]]


REFUSALS = [
    ({"MAIL": b"452 4.3.1 out of storage"}, Retry, "452 4.3.1"),
    ({"MAIL": b"553 5.7.1 sender not allowed"}, Fail, "553 5.7.1"),
    ({"RCPT": b"451 4.7.1 greylisted", "DATA": b"554 no valid recipients"}, Retry, "451 4.7.1"),
    ({"RCPT": b"550 5.1.1 no such user", "DATA": b"554 no valid recipients"}, Fail, "550 5.1.1"),
    ({"RCPT": b"550 5.1.1 no such user"}, Fail, "550 5.1.1"),  # DATA answered 354 anyway
    ({"DATA": b"451 4.3.0 try later"}, Retry, "451 4.3.0"),
    ({"END": b"552 5.3.4 message too big"}, Fail, "552 5.3.4"),
    ({"END": b"450-4.2.0 mailbox busy\r\n450 4.2.0 come back"}, Retry, "come back"),
]


async def test_pipelining_over_implicit_tls(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    async with serving(tls=server_tls) as pipe_server:
        pool = _pool(pipe_server.port, ca_file=cert)
        try:
            await pool.send("from@example.test", ["to@example.test"], MESSAGE)
            await pool.send("from@example.test", ["to@example.test"], MESSAGE)
        finally:
            await pool.close()
    assert pool.pipelined == 2 and pool.opened == 1
    assert pipe_server.reads.count(["MAIL", "RCPT", "DATA"]) == 2
    assert pipe_server.messages == [MESSAGE, MESSAGE]


@pytest.mark.parametrize(("replies", "kind", "reply"), REFUSALS)
async def test_each_pipelined_reply_maps_to_its_outcome(replies: dict[str, bytes], kind: type, reply: str) -> None:
    server = PipeServer(replies=replies)
    await server.start()
    pool = _pool(server.port)
    try:
        with pytest.raises(aiosmtplib.SMTPException) as caught:
            await pool.send("from@example.test", ["to@example.test"], MESSAGE)
    finally:
        await pool.close()
        await server.stop()
    outcome = outcome_of(caught.value)
    assert isinstance(outcome, kind) and reply in str(outcome)
    if "END" in replies:
        assert server.messages == [MESSAGE]  # refused after the whole message arrived
    elif replies.get("DATA", b"354").startswith(b"354"):
        # DATA was accepted without a valid envelope: the client ended an empty message.
        assert server.messages == [b""]
    else:
        assert server.messages == []


async def test_a_connection_dropped_mid_transaction_is_retried() -> None:
    async with serving(drop_at="DATA") as pipe_server:
        pool = _pool(pipe_server.port)
        try:
            with pytest.raises(aiosmtplib.SMTPException) as caught:
                await pool.send("from@example.test", ["to@example.test"], MESSAGE)
        finally:
            await pool.close()
    assert isinstance(outcome_of(caught.value), Retry)
    assert pipe_server.messages == []


async def test_a_multiline_final_reply_is_success() -> None:
    server = PipeServer(replies={"END": b"250-queued\r\n250 as 1234"})
    await server.start()
    pool = _pool(server.port)
    try:
        await pool.send("from@example.test", ["to@example.test"], MESSAGE)
    finally:
        await pool.close()
        await server.stop()
    assert server.messages == [MESSAGE] and pool.pipelined == 1


def test_pipelining_on_uvloop() -> None:
    # The service runs on uvloop, whose transports are not asyncio's classes.
    async def scenario() -> tuple[int, list[bytes]]:
        async with serving() as pipe_server:
            pool = _pool(pipe_server.port)
            try:
                await pool.send("from@example.test", ["to@example.test"], MESSAGE)
            finally:
                await pool.close()
        return pool.pipelined, pipe_server.messages

    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        pipelined, messages = thread.submit(uvloop.run, scenario()).result()
    assert pipelined == 1 and messages == [MESSAGE]


def test_dot_stuffing_and_line_ends() -> None:
    assert dot_stuffed(b".a\nb\r.c") == b"..a\r\nb\r\n..c\r\n.\r\n"
    assert dot_stuffed(b"x\r\n") == b"x\r\n.\r\n"
    assert dot_stuffed(b"a\r\nb\nc") == b"a\r\nb\r\nc\r\n.\r\n"  # a bare LF among CRLFs
    assert dot_stuffed(b"a\r\n.b\r\n") == b"a\r\n..b\r\n.\r\n"  # already CRLF, a dot to stuff
    assert dot_stuffed(b"plain\r\nlines\r\n") == b"plain\r\nlines\r\n.\r\n"


async def test_a_crlf_in_an_address_adds_no_command() -> None:
    async with serving() as pipe_server:
        pool = _pool(pipe_server.port)
        try:
            await pool.send("from@example.test", ["to@example.test\r\nRCPT TO:<evil@x.test>"], MESSAGE)
        finally:
            await pool.close()
    # aiosmtplib's address parsing keeps the mailbox and drops the rest, as in its sendmail.
    assert [c.split(b" SIZE=")[0] for c in pipe_server.commands[1:]] == [
        b"MAIL FROM:<from@example.test>",
        b"RCPT TO:<to@example.test>",
        b"DATA",
        b"QUIT",
    ]
