"""Signed unsubscribe links, and the gateway's one-click endpoint against the real preferences service."""

from __future__ import annotations

import httpx
import pytest
from belfry import service
from belfry.api.common.v1 import common_pb2
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.api.preferences.v1 import preferences_pb2, preferences_pb2_grpc
from belfry.auth import TokenIssuer
from belfry.errors import InvalidArgument
from belfry.preferences import Preferences
from belfry.unsubscribe import Signer
from starlette.applications import Starlette

from services.gateway.unsubscribe import routes
from services.preferences.server import build_for
from services.preferences.settings import load_settings
from tests.conftest import acting_channel, common_env
from tests.email.email_helpers import UNSUBSCRIBE_KEY

TOPIC = "contacts.contact_assigned"


class Clock:
    """Seconds that the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_tokens_reject_tampering_and_expiry() -> None:
    clock = Clock()
    signer = Signer(UNSUBSCRIBE_KEY.encode(), ttl_seconds=3600, clock=clock)
    token = signer.token("acc", "u1", TOPIC)
    assert signer.verify(token).topic == TOPIC
    body, _, mac = token.partition(".")
    forged = Signer(b"another-key-of-at-least-thirty-two-bytes", ttl_seconds=3600, clock=clock).token(
        "acc", "u2", TOPIC
    )
    for bad in (f"{body}.{mac[:-2]}AA", f"{forged.partition('.')[0]}.{mac}", "", "not-a-token"):
        with pytest.raises(InvalidArgument):
            signer.verify(bad)
    clock.now += 3601
    with pytest.raises(InvalidArgument, match="expired"):
        signer.verify(token)


async def test_one_click_post_switches_the_topic_off_for_email_through_the_unsubscribe_rpc(
    database_url: str, token_keys: dict[str, bytes], account_id: str
) -> None:
    settings = load_settings(common_env(database_url, token_keys))
    prefs = await service.start("preferences", settings.common, build_for(settings))
    channel = acting_channel(f"127.0.0.1:{prefs.port}")
    issuer = TokenIssuer(token_keys, "k1")
    try:
        directory = directory_pb2_grpc.DirectoryServiceStub(channel)
        await directory.UpsertAccount(
            directory_pb2.UpsertAccountRequest(
                account=directory_pb2.Account(account_id=account_id, name="Acme", tier=directory_pb2.TIER_STARTER)
            )
        )
        user = directory_pb2.User(
            account_id=account_id,
            user_id="u1",
            email="u1@example.test",
            display_name="U1",
            locale="en",
            time_zone="Europe/Paris",
            permission_set="sales",
            active=True,
        )
        await directory.UpsertUser(directory_pb2.UpsertUserRequest(user=user))
        signer = Signer(UNSUBSCRIBE_KEY.encode(), ttl_seconds=3600)
        app = Starlette(routes=routes(signer, Preferences(channel)))
        token = signer.token(account_id, "u1", TOPIC)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://app.test") as web:
            page = await web.get("/email/unsubscribe", params={"t": token})
            assert page.status_code == 200 and 'method="post"' in page.text
            bad = await web.post("/email/unsubscribe", params={"t": token[:-3] + "xyz"})
            assert bad.status_code == 400
            stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
            auth = [("authorization", f"Bearer {issuer.issue(account_id, 'u1')}")]
            before = await stub.GetPreferences(preferences_pb2.GetPreferencesRequest(), metadata=auth)
            assert not [c for c in before.choices if c.topic == TOPIC]
            done = await web.post("/email/unsubscribe", params={"t": token}, data={"List-Unsubscribe": "One-Click"})
            assert done.status_code == 200 and "no longer receive" in done.text
        after = await stub.GetPreferences(preferences_pb2.GetPreferencesRequest(), metadata=auth)
        assert [(c.topic, c.channel, c.enabled) for c in after.choices if c.topic == TOPIC] == [
            (TOPIC, common_pb2.CHANNEL_EMAIL, False)
        ]
        log = await stub.ListAuditLog(preferences_pb2.ListAuditLogRequest(), metadata=auth)
        # Audited as the link's doing: whoever holds a link is not signed in as the user.
        assert [(e.via, e.what, e.actor_user_id) for e in log.entries] == [("email-link", "unsubscribe", "")]
        # A locked topic is refused by preferences, and the page says so.
        locked = signer.token(account_id, "u1", "account.billing")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://app.test") as web:
            refused = await web.post("/email/unsubscribe", params={"t": locked})
        assert refused.status_code == 409 and "locked" in refused.text
    finally:
        await channel.close()
        await prefs.stop(0.1)
