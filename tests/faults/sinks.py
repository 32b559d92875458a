"""SMTP sinks for fault tests: the email tests' capture server, optionally one that stalls.

``Capture`` (tests/email/email_helpers.py) records every message a real
aiosmtpd server accepted. ``StallingCapture`` can also take a message's data
and then never answer, which is what a hung mail relay looks like from the
sender: the message was handed over, the sender does not know it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiosmtpd.controller import Controller

from tests.email.email_helpers import Capture, Caught
from tests.faults.postgres import free_port


@dataclass
class StallingCapture(Capture):
    """A capture server; while ``stall`` is set, DATA is recorded and never answered."""

    stall: bool = False
    on_stall: Callable[[Caught], None] | None = None  # called (in the server's thread) once the data is in

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's hook name
        """Record, then hang (stalling) or answer 250 (not stalling)."""
        if not self.stall:
            return await super().handle_DATA(server, session, envelope)
        item = Caught(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content or envelope.content)
        with self.lock:
            self.caught.append(item)
        if self.on_stall is not None:
            self.on_stall(item)
        await asyncio.Event().wait()  # cancelled when the controller stops
        return "451 4.3.0 never sent"


def message_ids(capture: Capture, account_id: str) -> collections.Counter[str]:
    """How many times each Message-ID of ``account_id`` was handed to the sink."""
    return collections.Counter(
        str(c.parsed["Message-ID"]) for c in capture.snapshot() if account_id in str(c.parsed["Message-ID"])
    )


@contextlib.contextmanager
def smtp_sink(capture: Capture | None = None) -> Iterator[tuple[Capture, int]]:
    """A started aiosmtpd server (in its own thread) on a free port: ``(capture, port)``."""
    handler = capture if capture is not None else Capture()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()
