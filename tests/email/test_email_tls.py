"""STARTTLS and AUTH against a real aiosmtpd server with a private CA; TLS settings parsing."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from services.email.settings import SmtpSettings, load_settings
from services.email.smtp import SmtpPool
from tests.email.email_helpers import Capture, email_env


def _authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"belfry", b"s3cret-password")
    return AuthResult(success=ok)


def _start(capture: Capture, certificate: tuple[Path, Path]) -> Iterator[int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    controller = Controller(
        capture,
        hostname="127.0.0.1",
        port=port,
        tls_context=context,
        require_starttls=True,
        authenticator=_authenticate,
        auth_required=True,
    )
    controller.start()
    yield port
    controller.stop()


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit-tls"])
def test_settings_parse_tls_and_auth(
    database_url: str, token_keys: dict[str, bytes], implicit: bool, certificate: tuple[Path, Path]
) -> None:
    flag = "BELFRY_SMTP_TLS" if implicit else "BELFRY_SMTP_STARTTLS"
    settings = load_settings(
        email_env(
            database_url,
            token_keys,
            2525,
            **{
                flag: "true",
                "BELFRY_SMTP_USER": "belfry",
                "BELFRY_SMTP_PASSWORD": "x",
                "BELFRY_SMTP_CA": str(certificate[0]),
            },
        )
    )
    assert settings.smtp.implicit_tls is implicit and settings.smtp.starttls is not implicit
    assert settings.smtp.ca_file == certificate[0]


async def test_sends_over_starttls_with_auth_and_checks_the_certificate(certificate: tuple[Path, Path]) -> None:
    capture = Capture()
    server = _start(capture, certificate)
    port = next(server)
    try:
        good = SmtpSettings("127.0.0.1", port, "belfry", "s3cret-password", True, False, 5.0, 1, certificate[0])
        pool = SmtpPool(good)
        await pool.send("a@b.test", ["tls@example.test"], b"Subject: tls\r\n\r\nhello\r\n")
        await pool.close()
        assert [c.rcpt_tos for c in capture.snapshot()] == [["tls@example.test"]]
        # Without the private CA the relay's certificate is not trusted: nothing is sent.
        untrusted = SmtpSettings("127.0.0.1", port, "belfry", "s3cret-password", True, False, 5.0, 1, None)
        with pytest.raises((aiosmtplib.SMTPException, ssl.SSLError)):
            await SmtpPool(untrusted).send("a@b.test", ["tls@example.test"], b"Subject: tls\r\n\r\nhello\r\n")
        assert len(capture.snapshot()) == 1
    finally:
        next(server, None)
