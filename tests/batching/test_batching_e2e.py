"""End to end: a merged window reaches the real email sender (SMTP) and the gateway's bell feed as one item."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from aiosmtpd.controller import Controller
from belfry import service

from services.email.server import build_for as email_build_for
from services.email.settings import load_settings as email_settings
from services.gateway import server as gateway_server
from services.gateway import settings as gateway_settings
from tests.batching.conftest import World
from tests.conftest import service_token
from tests.email.email_helpers import Capture, email_env


@pytest.fixture
def smtp() -> Iterator[tuple[Capture, int]]:
    """A real SMTP server (aiosmtpd) on a free port, keeping every message."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    capture = Capture()
    controller = Controller(capture, hostname="127.0.0.1", port=port)
    controller.start()
    yield capture, port
    controller.stop()


async def test_three_assignments_arrive_as_one_email_and_one_bell_item(
    world: World, tenant: str, smtp: tuple[Capture, int]
) -> None:
    capture, port = smtp
    env = email_env(world.env["BELFRY_DATABASE_URL"], _keys(world), port)
    mail_settings = email_settings(env)
    senders: list[service.Running] = [
        await service.start("email", mail_settings.common, email_build_for(mail_settings), pool=world.pool)
    ]
    gw = gateway_settings.load_settings(
        {
            **world.env,
            "BELFRY_GATEWAY_HTTP_HOST": "127.0.0.1",
            "BELFRY_GATEWAY_HTTP_PORT": "0",
            "BELFRY_SERVICE_TOKEN": service_token("gateway"),
        }
    )
    senders.append(await service.start("gateway", gw.common, gateway_server.GatewayBuild(gw), pool=world.pool))
    try:
        await world.start_replica()
        for n in ("1", "2", "3"):
            await world.handoff(tenant, "ana", world.assignment(tenant, "ana", n))
        await world.until(lambda: world.handled(tenant), "handoffs applied")
        world.clock.advance(301)

        async def delivered() -> bool:
            sent = await world.pool.fetchval(
                "select count(*) from queue.deliveries where account_id = $1 and channel in ('email', 'bell')"
                " and state = 'sent'",
                tenant,
            )
            return bool(sent == 2)

        await world.until(delivered, "the email and bell senders")
        [mail] = [c for c in capture.snapshot() if c.rcpt_tos == ["ana@example.test"] and tenant.encode() in c.raw]
        parsed = mail.parsed
        assert parsed["Subject"] == "3 contacts were assigned to you"
        text = parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        for name in ("Contact 1", "Contact 2", "Contact 3"):
            assert name in text
        feed = await world.pool.fetch(
            "select title, items from gateway.feed where account_id = $1 and user_id = 'ana'", tenant
        )
        assert [r["title"] for r in feed] == ["3 contacts were assigned to you"]
        items = feed[0]["items"]
        items = json.loads(items) if isinstance(items, str) else items
        assert [i["id"] for i in items] == ["1", "2", "3"]
    finally:
        for running in senders:
            await running.stop(0.2)


def _keys(world: World) -> dict[str, bytes]:
    raw = world.env["BELFRY_TOKEN_KEYS"]
    return {kid: secret.encode() for kid, _, secret in (part.partition("=") for part in raw.split(","))}
