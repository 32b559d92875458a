"""A built-in SMTP mail catcher for the embedded local run.

Every message the email sender hands it is stored as an ``.eml`` file in a
folder, so ``belfry mail`` can list and show what would have been sent. It is
aiosmtpd's own server, so the sender talks real SMTP to it. aiosmtpd comes
with the ``local`` extra and is imported only when the catcher starts:
listing caught mail, and every service, work without it.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from belfry.errors import ConfigError

if TYPE_CHECKING:
    from aiosmtpd.controller import Controller


class _Store:
    """aiosmtpd handler writing each message to ``<folder>/<ns>.eml``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's hook name
        """Store the raw message; 250 tells the sender it was accepted."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{time.time_ns()}.eml"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(envelope.original_content or envelope.content)
        tmp.rename(path)  # readers never see a half-written file
        return "250 Message accepted for delivery"


def start(folder: Path, host: str = "127.0.0.1", port: int = 0) -> tuple[Controller, int]:
    """Start the catcher in its own thread; return it and the bound port (0 = any free port)."""
    try:
        from aiosmtpd.controller import Controller  # noqa: PLC0415 - development tooling, the local extra
    except ModuleNotFoundError as exc:
        raise ConfigError(
            "the mail catcher needs the local extra: pip install -e '.[local]' (./scripts/up does), "
            "or set BELFRY_SMTP_HOST to a real SMTP server"
        ) from exc
    if port == 0:
        # aiosmtpd's controller probes the port it was given, so it cannot take 0 itself.
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    controller = Controller(_Store(folder), hostname=host, port=port)
    controller.start()
    server = controller.server
    assert isinstance(server, asyncio.Server)
    bound = server.sockets[0].getsockname()[1]
    return controller, int(bound)


@dataclass(frozen=True)
class CaughtMail:
    """One caught message, summarised."""

    index: int
    path: Path
    to: str
    subject: str
    date: str


def caught(folder: Path) -> list[CaughtMail]:
    """Every caught message, oldest first."""
    found: list[CaughtMail] = []
    for index, path in enumerate(sorted(folder.glob("*.eml"), key=lambda p: int(p.stem)), start=1):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        found.append(CaughtMail(index, path, str(msg["To"] or ""), str(msg["Subject"] or ""), str(msg["Date"] or "")))
    return found
