"""VERP (issue 20): each delivery's envelope sender names it, signed so it cannot be moved to another
account's delivery or another address; keys rotate with old and new accepted."""

from __future__ import annotations

import asyncpg
import pytest
from belfry import service
from belfry.errors import ConfigError

from services.email.server import build_for
from services.email.settings import load_settings
from services.email.verp import Bounce, Verp
from tests.email.email_helpers import Capture, email_env, enqueue_messages, message, wait_until_finished

OLD_KEY = "verp-key-for-tests-only-old-0123456789"
NEW_KEY = "verp-key-for-tests-only-new-0123456789"


async def test_envelope_sender_names_the_delivery(
    database_url: str, token_keys: dict[str, bytes], pool: asyncpg.Pool, smtp: tuple[Capture, int], account_id: str
) -> None:
    capture, port = smtp
    env = email_env(
        database_url, token_keys, port, BELFRY_EMAIL_VERP_KEYS=OLD_KEY, BELFRY_EMAIL_BOUNCE_DOMAIN="Bounce.Belfry.test"
    )
    settings = load_settings(env)
    running = await service.start("email", settings.common, build_for(settings))
    try:
        msgs = [message(account_id, user_id=u, recipient_email=f"{u}@example.test") for u in ("u1", "u2")]
        await enqueue_messages(pool, msgs)
        done = await wait_until_finished(pool, account_id, 2)
    finally:
        await running.stop(0.1)
    ids = {d["user_id"]: d["delivery_id"] for d in done}
    caught = {c.rcpt_tos[0]: c for c in capture.snapshot() if c.rcpt_tos[0] in ("u1@example.test", "u2@example.test")}
    senders = {rcpt: c.mail_from for rcpt, c in caught.items()}
    assert len(set(senders.values())) == 2  # one envelope sender per delivery
    # The From header stays the configured sender; only the envelope changes.
    assert all(c.parsed["From"].addresses[0].addr_spec == "notify@belfry.test" for c in caught.values())

    mail_from = senders["u1@example.test"]
    assert mail_from.startswith("bounces+") and mail_from.endswith("@bounce.belfry.test")
    assert len(mail_from.split("@")[0]) <= 64  # RFC 5321's local-part limit, for this account id
    signer = settings.verp
    assert signer is not None
    assert signer.verify(mail_from, "U1@example.test") == Bounce(account_id, ids["u1"])
    # Bound to its recipient: it does not vouch for another address of the account.
    assert signer.verify(mail_from, "u2@example.test") is None
    # Rotation: the new key signs, the old one still verifies what it signed; a dropped key does not.
    rotated = Verp([NEW_KEY.encode(), OLD_KEY.encode()], "bounce.belfry.test")
    assert rotated.verify(mail_from, "u1@example.test") == Bounce(account_id, ids["u1"])
    assert rotated.address(account_id, ids["u1"], "u1@example.test") != mail_from
    assert Verp([NEW_KEY.encode()], "bounce.belfry.test").verify(mail_from, "u1@example.test") is None


def test_tokens_cannot_be_moved_to_another_delivery_or_account() -> None:
    verp = Verp([OLD_KEY.encode()], "bounce.belfry.test")
    genuine = verp.address("acc_a", 41, "x@example.test")
    local, domain = genuine.split("@")
    prefix, account, delivery, mac = local.replace("+", "-", 1).split("-")
    other_account = verp.address("acc_b", 41, "x@example.test").split("+")[1].split("-")[0]
    forged = [
        f"{prefix}+{account}-42-{mac}@{domain}",  # another delivery
        f"{prefix}+{other_account}-{delivery}-{mac}@{domain}",  # another account
        f"{prefix}+{account}-{delivery}-{mac}@elsewhere.test",  # another domain
        f"{prefix}+{account}-{delivery}-{'a' * 16}@{domain}",  # a made-up MAC
        "notify@belfry.test",
    ]
    assert verp.verify(genuine, "x@example.test") == Bounce("acc_a", 41)
    for address in forged:
        assert verp.verify(address, "x@example.test") is None, address


def test_verp_keys_must_be_long_secrets(token_keys: dict[str, bytes]) -> None:
    env = email_env("postgresql://unused/db", token_keys, 25, BELFRY_EMAIL_VERP_KEYS=f"{NEW_KEY}, short")
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert "BELFRY_EMAIL_VERP_KEYS" in caught.value.message
    both = load_settings(
        email_env("postgresql://unused/db", token_keys, 25, BELFRY_EMAIL_VERP_KEYS=f"{NEW_KEY},{OLD_KEY}")
    )
    assert both.verp is not None and list(both.verp.keys) == [NEW_KEY.encode(), OLD_KEY.encode()]
    assert both.verp.domain == "belfry.test"  # the From address's domain by default
    assert load_settings(email_env("postgresql://unused/db", token_keys, 25)).verp is None
