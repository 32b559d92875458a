"""The preferences service started in-process on port 0, with a settable clock."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import grpc
import pytest
from belfry import service
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.api.preferences.v1 import preferences_pb2_grpc
from belfry.auth import TokenIssuer

from services.preferences.server import build_for
from services.preferences.settings import load_settings
from tests.conftest import acting_channel, common_env


class Clock:
    """A clock the test moves by hand (no sleeping)."""

    def __init__(self) -> None:
        self.now = dt.datetime(2026, 3, 4, 12, 0, tzinfo=dt.UTC)  # a Wednesday

    def __call__(self) -> dt.datetime:
        return self.now


@dataclass
class Prefs:
    """Stubs to one running preferences service, and a way to sign tokens."""

    port: int
    channel: grpc.aio.Channel
    prefs: preferences_pb2_grpc.PreferencesServiceStub
    directory: directory_pb2_grpc.DirectoryServiceStub
    issuer: TokenIssuer
    clock: Clock

    def auth(self, account_id: str, user_id: str) -> tuple[tuple[str, str]]:
        """Metadata carrying a valid token for (account, user)."""
        return (("authorization", f"Bearer {self.issuer.issue(account_id, user_id)}"),)

    async def account(
        self, account_id: str, tier: directory_pb2.Tier.ValueType = directory_pb2.TIER_ENTERPRISE
    ) -> None:
        """Create an account."""
        await self.directory.UpsertAccount(
            directory_pb2.UpsertAccountRequest(
                account=directory_pb2.Account(account_id=account_id, name="Acme", tier=tier)
            )
        )

    async def user(self, account_id: str, user_id: str, **fields: object) -> None:
        """Create a user (active, Paris time) with optional overrides."""
        values: dict[str, object] = {
            "email": f"{user_id}@example.test",
            "display_name": user_id.title(),
            "locale": "en",
            "time_zone": "Europe/Paris",
            "permission_set": "sales",
            "active": True,
        }
        values.update(fields)
        await self.directory.UpsertUser(
            directory_pb2.UpsertUserRequest(user=directory_pb2.User(account_id=account_id, user_id=user_id, **values))  # type: ignore[arg-type]
        )


async def start_prefs(
    database_url: str, token_keys: dict[str, bytes], pool: asyncpg.Pool, clock: Clock
) -> service.Running:
    """One more replica of the service on the same database."""
    settings = load_settings(common_env(database_url, token_keys))
    return await service.start("preferences", settings.common, build_for(settings, clock=clock), pool=pool)


@pytest.fixture(scope="session")
async def prefs_service(database_url: str, token_keys: dict[str, bytes], pool: asyncpg.Pool) -> AsyncIterator[Prefs]:
    """The service for the whole session; tests keep apart by account."""
    clock = Clock()
    running = await start_prefs(database_url, token_keys, pool, clock)
    channel = acting_channel(f"127.0.0.1:{running.port}")
    yield Prefs(
        running.port,
        channel,
        preferences_pb2_grpc.PreferencesServiceStub(channel),
        directory_pb2_grpc.DirectoryServiceStub(channel),
        TokenIssuer(token_keys, "k1"),
        clock,
    )
    await channel.close()
    await running.stop()


@pytest.fixture
def svc(prefs_service: Prefs) -> Prefs:
    """The session's service with its clock put back to the reference time."""
    prefs_service.clock.now = Clock().now
    return prefs_service
