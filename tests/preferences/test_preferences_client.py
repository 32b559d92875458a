"""The kit's preferences client against the real service: answers, labels and the one error mapping."""

from __future__ import annotations

import socket

import pytest
from belfry import errors, rpc
from belfry.config import TlsSettings
from belfry.preferences import Preferences

from tests.preferences.conftest import Prefs


async def test_answers_topic_labels_and_recipients(svc: Prefs, account_id: str) -> None:
    await svc.account(account_id)
    await svc.user(account_id, "ana", locale="fr-CA")
    client = Preferences(svc.channel)
    topic, people = await client.effective(account_id, "contacts.contact_assigned", ["ana", "ana", "zed"])
    assert topic.label("fr-CA") == "Contact qui vous est attribué" and topic.label("de") == "Contact assigned to you"
    assert topic.batching == "assignment" and "email" in topic.allowed_channels
    assert people["ana"].known and people["ana"].locale == "fr-CA" and "email" in people["ana"].on
    assert not people["zed"].known
    assert people["ana"].held_until(locked=False) is None


async def test_refusals_keep_their_kind_and_field(svc: Prefs, account_id: str) -> None:
    await svc.account(account_id)
    await svc.user(account_id, "ana")
    client = Preferences(svc.channel, field_prefix="event.")
    with pytest.raises(errors.NotFound) as unknown_topic:
        await client.effective(account_id, "contacts.nope", ["ana"])
    assert unknown_topic.value.field == "event.topic" and "contacts.nope" in unknown_topic.value.message
    with pytest.raises(errors.NotFound) as unknown_account:
        await client.effective(account_id + "x", "contacts.contact_assigned", ["ana"])
    assert unknown_account.value.field == "event.account_id"
    with pytest.raises(errors.InvalidArgument):
        await client.effective(account_id, "contacts.contact_assigned", ["ana\x00"])
    # A locked topic cannot be unsubscribed from: refused as it is, never "retry later".
    with pytest.raises(errors.FailedPrecondition):
        await client.unsubscribe(account_id, "ana", "account.billing")


async def test_an_unreachable_service_is_unavailable() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    channel = rpc.connect(dead, TlsSettings(None, None, None))
    try:
        with pytest.raises(errors.Unavailable, match="did not answer"):
            await Preferences(channel, deadline=2.0).effective("acc", "contacts.contact_assigned", ["ana"])
    finally:
        await channel.close()
