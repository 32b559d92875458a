"""The unsubscribe-link key rotates without downtime while email deliveries flow (issue 17, section 5).

Email senders sign, gateways verify. Each step of the rotation starts the
new replicas before stopping the old ones, as a rolling update does, while
a producer keeps enqueueing: every delivery is sent, and every link in an
inbox keeps working until its key is dropped after the links' lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from belfry import rpc, service
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.errors import InvalidArgument
from belfry.unsubscribe import Signer

from services.email.server import build_for as email_build_for
from services.email.settings import load_settings as email_settings
from services.gateway import server as gateway_server
from services.gateway import settings as gateway_settings
from services.preferences.server import build_for as preferences_build_for
from services.preferences.settings import load_settings as preferences_settings
from tests.conftest import client_tls, common_env
from tests.email.email_helpers import Capture, email_env, enqueue_messages, message, wait_until_finished

OLD = "old-unsubscribe-key-for-tests-0123456789"
NEW = "new-unsubscribe-key-for-tests-0123456789"


@pytest.fixture
async def directory(database_url: str, token_keys: dict[str, bytes], account_id: str) -> AsyncIterator[str]:
    """The preferences service with the account's user u1; its address."""
    settings = preferences_settings(common_env(database_url, token_keys))
    running = await service.start("preferences", settings.common, preferences_build_for(settings))
    address = f"127.0.0.1:{running.port}"
    channel = rpc.connect(address, client_tls())
    stub = directory_pb2_grpc.DirectoryServiceStub(channel)
    account = directory_pb2.Account(account_id=account_id, name="Acme", tier=directory_pb2.TIER_STARTER)
    await stub.UpsertAccount(directory_pb2.UpsertAccountRequest(account=account))
    user = directory_pb2.User(
        account_id=account_id,
        user_id="u1",
        email="u1@example.test",
        display_name="U1",
        locale="en",
        time_zone="UTC",
        permission_set="sales",
        active=True,
    )
    await stub.UpsertUser(directory_pb2.UpsertUserRequest(user=user))
    await channel.close()
    yield address
    await running.stop(0.1)


class Replicas:
    """The email senders and gateways of one step of the rotation."""

    def __init__(self, database_url: str, token_keys: dict[str, bytes], smtp_port: int, directory: str) -> None:
        self.database_url = database_url
        self.token_keys = token_keys
        self.smtp_port = smtp_port
        self.directory = directory

    async def start(self, key: str, others: str = "") -> tuple[service.Running, service.Running, str]:
        """An email sender and a gateway holding ``key`` (current) and ``others``; → (email, gateway, base URL)."""
        keys = {"BELFRY_UNSUBSCRIBE_KEY": key, "BELFRY_UNSUBSCRIBE_OTHER_KEYS": others}
        env = email_env(self.database_url, self.token_keys, self.smtp_port) | keys
        sender = email_settings(env)
        email = await service.start("email", sender.common, email_build_for(sender))
        web = gateway_settings.load_settings(
            common_env(
                self.database_url,
                self.token_keys,
                identity="gateway",
                BELFRY_GATEWAY_HTTP_HOST="127.0.0.1",
                BELFRY_GATEWAY_HTTP_PORT="0",
                BELFRY_PREFERENCES_ADDRESS=self.directory,
                **keys,
            )
        )
        build = gateway_server.GatewayBuild(web)
        gateway = await service.start("gateway", web.common, build)
        return email, gateway, f"http://127.0.0.1:{build.http_port}"


def _links(capture: Capture) -> list[str]:
    return [str(c.parsed["List-Unsubscribe"]).strip("<>") for c in capture.snapshot()]


def _token(link: str) -> str:
    return httpx.URL(link).params["t"]


async def _confirm(base: str, link: str) -> int:
    async with httpx.AsyncClient(base_url=base) as web:
        return (await web.get("/email/unsubscribe", params={"t": _token(link)})).status_code


async def test_the_unsubscribe_key_rotates_while_deliveries_flow(
    database_url: str,
    token_keys: dict[str, bytes],
    pool: asyncpg.Pool,
    smtp: tuple[Capture, int],
    directory: str,
    account_id: str,
) -> None:
    capture, port = smtp
    replicas = Replicas(database_url, token_keys, port, directory)
    enqueued = 0
    flowing = True

    async def produce() -> None:
        nonlocal enqueued
        while flowing:
            await enqueue_messages(pool, [message(account_id, "u1")])
            enqueued += 1
            await asyncio.sleep(0.02)

    producer = asyncio.ensure_future(produce())
    try:
        # Before: the old key only.
        email, gateway, _ = await replicas.start(OLD)
        await wait_until_finished(pool, account_id, 3, states=("sent",))
        # Step 1: every replica also holds the new key; nothing signs with it yet. New replicas first.
        email2, gateway2, _ = await replicas.start(OLD, NEW)
        await email.stop(0.5)
        await gateway.stop(0.5)
        # Step 2: the new key signs; the old one is still accepted.
        email3, gateway3, base = await replicas.start(NEW, OLD)
        await email2.stop(0.5)
        await gateway2.stop(0.5)
        sent_before = len(capture.snapshot())
        await wait_until_finished(pool, account_id, sent_before + 3, states=("sent",))
    finally:
        flowing = False
        await producer
    old_only = Signer(OLD.encode(), ttl_seconds=3600)
    new_only = Signer(NEW.encode(), ttl_seconds=3600)
    links = _links(capture)
    old_links, new_links = [], []
    for link in links:
        try:
            old_only.verify(_token(link))
            old_links.append(link)
        except InvalidArgument:
            new_only.verify(_token(link))  # every link is signed with one of the two keys
            new_links.append(link)
    assert old_links and new_links
    # A link from before the rotation and one from after both work on the replicas of step 2.
    assert await _confirm(base, old_links[0]) == 200
    assert await _confirm(base, new_links[-1]) == 200
    # Every delivery enqueued across the restarts was sent: none failed for a key.
    rows = await wait_until_finished(pool, account_id, enqueued, states=("sent",))
    assert len(rows) == enqueued
    assert not await pool.fetchval(
        "select count(*) from queue.deliveries where account_id = $1 and state <> 'sent'", account_id
    )
    # Step 3, once the links' lifetime has passed: the old key is dropped, and with it its links.
    email4, gateway4, base4 = await replicas.start(NEW)
    try:
        assert await _confirm(base4, old_links[0]) == 400
        assert await _confirm(base4, new_links[-1]) == 200
    finally:
        for running in (email3, gateway3, email4, gateway4):
            with contextlib.suppress(Exception):
                await running.stop(0.5)


def test_a_link_signed_with_the_previous_key_works_until_it_expires() -> None:
    now = [1_800_000_000.0]
    old = Signer(OLD.encode(), ttl_seconds=3600, clock=lambda: now[0])
    link = old.token("acc", "u1", "contacts.contact_assigned")
    rotated = Signer(NEW.encode(), ttl_seconds=3600, clock=lambda: now[0], others=[OLD.encode()])
    assert rotated.verify(link).user_id == "u1"
    now[0] += 3599
    assert rotated.verify(link).user_id == "u1"
    now[0] += 2
    with pytest.raises(InvalidArgument, match="expired"):
        rotated.verify(link)
    # A key held by nobody signs nothing that is accepted.
    stranger = Signer(b"a-key-no-replica-holds-0123456789abcdef", ttl_seconds=3600, clock=lambda: now[0])
    with pytest.raises(InvalidArgument, match="not valid"):
        rotated.verify(stranger.token("acc", "u1", "contacts.contact_assigned"))
