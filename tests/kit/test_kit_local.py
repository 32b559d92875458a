"""The local run: its environment, the mail catcher and the ``belfry mail`` command."""

from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest
from belfry import cli
from belfry.local import mailcatcher, supervisor

from services.email.settings import load_settings as email_settings


async def test_caught_mail_is_listed_and_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    controller, port = mailcatcher.start(tmp_path / "mail")
    try:
        for n in (1, 2):
            msg = EmailMessage()
            msg["From"] = "belfry@example.test"
            msg["To"] = f"user{n}@example.test"
            msg["Subject"] = f"Subject {n}"
            msg.set_content(f"body {n}")
            await aiosmtplib.send(msg, hostname="127.0.0.1", port=port)
    finally:
        controller.stop()
    mails = mailcatcher.caught(tmp_path / "mail")
    assert [(m.to, m.subject) for m in mails] == [
        ("user1@example.test", "Subject 1"),
        ("user2@example.test", "Subject 2"),
    ]
    assert cli.main(["--home", str(tmp_path), "mail"]) == 0
    listing = capsys.readouterr().out
    assert "user2@example.test" in listing and "Subject 1" in listing
    assert cli.main(["--home", str(tmp_path), "mail", "2"]) == 0
    shown = capsys.readouterr().out
    assert "Subject: Subject 2" in shown and "body 2" in shown
    assert cli.main(["--home", str(tmp_path), "mail", "3"]) == 1


def test_the_local_mesh_sets_the_sender_address_the_email_service_reads(tmp_path: Path) -> None:
    env = supervisor.mesh_env(tmp_path, "postgresql://postgres@127.0.0.1:5432/belfry", ("127.0.0.1", 2525), {})
    sender = email_settings(env).from_address
    assert sender.addr_spec == "notifications@belfry.localhost"
    assert sender.display_name == "Belfry"
