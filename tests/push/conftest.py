"""Fixtures of the push senders: a test CA, the loopback push service, a running webpush service."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from belfry import rpc, service
from belfry.auth import TokenIssuer
from belfry.message import Message
from belfry.queue import NewDelivery, enqueue

from services.webpush.server import build_for as webpush_build_for
from services.webpush.settings import load_settings as webpush_settings
from tests.conftest import client_tls, common_env, fresh_database, open_pool
from tests.push.fakes.http import serve_tls
from tests.push.fakes.push_service import PushService
from tests.push.fakes.tls import Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA and a localhost certificate."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
async def push_service(pki: Pki) -> AsyncIterator[PushService]:
    """The loopback browser push service (state is per session; tests use their own subscriptions)."""
    fake = PushService()
    async with serve_tls(fake.app, pki) as port:
        fake.origin = f"https://localhost:{port}"
        yield fake


def push_port(fake: PushService) -> int:
    """The fake's port."""
    return int(fake.origin.rsplit(":", 1)[1])


@pytest.fixture(scope="session")
async def webpush(
    database_url: str,
    token_keys: dict[str, bytes],
    pki: Pki,
    push_service: PushService,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[service.Running]:
    """The webpush service on port 0, allowed to reach the loopback push service (and nothing else private)."""
    key_file: Path = tmp_path_factory.mktemp("vapid") / "vapid.pem"
    env = common_env(
        database_url,
        token_keys,
        identity="webpush",
        BELFRY_WEBPUSH_ALLOWED_HOSTS=f"localhost,{'push.rebind.test'}",
        BELFRY_WEBPUSH_ALLOWED_PORTS=str(push_port(push_service)),
        BELFRY_WEBPUSH_ALLOW_NETWORKS="127.0.0.0/8",
        BELFRY_WEBPUSH_CA_FILE=str(pki.ca_file),
        BELFRY_VAPID_PRIVATE_KEY_FILE=str(key_file),
        BELFRY_VAPID_SUBJECT="mailto:ops@example.com",
        BELFRY_WEBPUSH_LEASE_SECONDS="5",
        BELFRY_UNSUBSCRIBE_KEY=OPEN_KEY,  # pushes open the gateway's /open link (marks read, then redirects)
    )
    settings = webpush_settings(env)
    running = await service.start("webpush", settings.common, webpush_build_for(settings))
    yield running
    await running.stop(0.1)


OPEN_KEY = "o" * 40  # the key the gateway verifies open links with (BELFRY_UNSUBSCRIBE_KEY)


def token_for(token_keys: dict[str, bytes], account_id: str, user_id: str) -> list[tuple[str, str]]:
    """gRPC metadata carrying a user token."""
    return [("authorization", f"Bearer {TokenIssuer(token_keys, 'k1').issue(account_id, user_id)}")]


@pytest.fixture
async def channel(webpush: service.Running) -> AsyncIterator[grpc.aio.Channel]:
    """A client channel to the webpush service."""
    async with rpc.connect(f"127.0.0.1:{webpush.port}", client_tls()) as ch:
        yield ch


def message(account_id: str, user_id: str, **overrides: object) -> Message:
    """A rendered notification."""
    fields: dict[str, object] = {
        "notification_id": str(uuid.uuid4()),
        "account_id": account_id,
        "user_id": user_id,
        "topic": "contacts.contact_assigned",
        "title": "Contact assigned",
        "body": "Ana assigned <b>Contact 42</b> to you",
        "url": "https://crm.example.com/contacts/42",
        "occurred_at": datetime.now(UTC).isoformat(),
    }
    fields.update(overrides)
    return Message(**fields)  # type: ignore[arg-type]  # test helper: keyword overrides of the dataclass


async def enqueue_message(pool: asyncpg.Pool, channel_name: str, msg: Message) -> None:
    """Enqueue one delivery of ``msg`` on ``channel_name`` as the dispatcher would."""
    async with pool.acquire() as conn, conn.transaction():
        await enqueue(
            conn,
            [
                NewDelivery(
                    account_id=msg.account_id,
                    notification_id=uuid.UUID(msg.notification_id),
                    user_id=msg.user_id,
                    channel=channel_name,
                    topic=msg.topic,
                    payload=msg.to_json(),
                    expires_at=datetime.now(UTC) + timedelta(hours=1),
                )
            ],
        )


# This area runs senders, which claim every due row of their channel: it gets a
# database of its own so rows written by other areas' tests never reach them.
@pytest.fixture(scope="session")
async def database_url(admin_dsn: str) -> AsyncIterator[str]:
    """This area's own freshly migrated database."""
    async with fresh_database(admin_dsn) as url:
        yield url


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on this area's database."""
    async with open_pool(database_url) as p:
        yield p
