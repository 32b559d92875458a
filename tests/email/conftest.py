"""A real SMTP server (aiosmtpd) on a free port that keeps every raw message."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from aiosmtpd.controller import Controller

from tests.email.email_helpers import Capture


@pytest.fixture
def smtp() -> Iterator[tuple[Capture, int]]:
    """A started capture server and its port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    capture = Capture()
    controller = Controller(capture, hostname="127.0.0.1", port=port)
    controller.start()
    yield capture, port
    controller.stop()
