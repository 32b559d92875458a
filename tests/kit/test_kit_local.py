"""The local run: its environment, the mail catcher, and the ``belfry mail`` and ``belfry token`` commands."""

from __future__ import annotations

import os
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest
from belfry import auth, cli, config
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


def test_token_without_local_secrets_says_what_to_run(tmp_path: Path) -> None:
    # The installed command, as a person runs it, with no keys anywhere.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BELFRY_")}
    home = tmp_path / "never-up"
    done = subprocess.run(  # noqa: S603 - our own command, fixed arguments
        [str(Path(sys.executable).parent / "belfry"), "--home", str(home), "token"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert f"belfry --home {home} up" in done.stderr
    assert "BELFRY_TOKEN_KEYS" in done.stderr


def test_token_signs_with_the_keys_the_local_run_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = supervisor.mesh_env(tmp_path, "postgresql://postgres@127.0.0.1:5432/belfry", None, {})
    monkeypatch.delenv("BELFRY_TOKEN_KEYS", raising=False)
    monkeypatch.delenv("BELFRY_TOKEN_ACTIVE_KID", raising=False)
    assert cli.main(["--home", str(tmp_path), "token", "--account", "acc_1", "--user", "ana"]) == 0
    verifier = auth.TokenVerifier(config.parse_token_keys(env["BELFRY_TOKEN_KEYS"]))
    caller, _expires = verifier.verify(capsys.readouterr().out.strip())
    assert (caller.account_id, caller.user_id) == ("acc_1", "ana")
