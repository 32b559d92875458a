"""The EffectiveBatch cache is never stale: a write that returned is seen by the next read on any replica."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from belfry.api.directory.v1 import directory_pb2
from belfry.api.preferences.v1 import preferences_pb2, preferences_pb2_grpc

from tests.conftest import acting_channel
from tests.preferences.conftest import Prefs, start_prefs
from tests.preferences.preferences_helpers import CHANNELS, choice

T = "leads.lead_assigned"


@pytest.fixture
async def replica(
    svc: Prefs, database_url: str, token_keys: dict[str, bytes], pool: asyncpg.Pool
) -> AsyncIterator[preferences_pb2_grpc.PreferencesServiceStub]:
    """A second replica of the service on the same database, with its own cache."""
    running = await start_prefs(database_url, token_keys, pool, svc.clock)
    channel = acting_channel(f"127.0.0.1:{running.port}")
    yield preferences_pb2_grpc.PreferencesServiceStub(channel)
    await channel.close()
    await running.stop()


async def _email(
    stub: preferences_pb2_grpc.PreferencesServiceStub, account_id: str, user: str = "ana"
) -> tuple[bool, str]:
    answer = await stub.EffectiveBatch(
        preferences_pb2.EffectiveBatchRequest(account_id=account_id, topic=T, user_ids=[user, "zed"])
    )
    email = next(c for c in answer.recipients[0].channels if CHANNELS[c.channel - 1] == "email")
    return email.enabled, email.reason


async def test_writes_on_one_replica_are_read_on_the_other(
    svc: Prefs, replica: preferences_pb2_grpc.PreferencesServiceStub, account_id: str, pool: asyncpg.Pool
) -> None:
    await svc.account(account_id)
    await svc.user(account_id, "boss", super_admin=True, permission_set="admin")
    await svc.user(account_id, "ana")
    # Both replicas cache the answer first.
    for stub in (svc.prefs, replica):
        assert await _email(stub, account_id) == (True, "product_default")
        assert await _email(stub, account_id) == (True, "product_default")
    await svc.prefs.SetPreference(
        preferences_pb2.SetPreferenceRequest(choice=choice(T, "email", False)), metadata=svc.auth(account_id, "ana")
    )
    assert await _email(replica, account_id) == (False, "user")
    await replica.ResetToDefaults(preferences_pb2.ResetToDefaultsRequest(), metadata=svc.auth(account_id, "ana"))
    assert await _email(svc.prefs, account_id) == (True, "product_default")
    # Account-level layers and directory facts invalidate too.
    await replica.SetAccountDefaults(
        preferences_pb2.SetAccountDefaultsRequest(choices=[choice(T, "email", False)]),
        metadata=svc.auth(account_id, "boss"),
    )
    assert await _email(svc.prefs, account_id) == (False, "account_default")
    await svc.account(account_id, directory_pb2.TIER_STARTER)
    assert await _email(replica, account_id) == (True, "product_default")
    await svc.user(account_id, "ana", active=False)
    answer = await replica.EffectiveBatch(
        preferences_pb2.EffectiveBatchRequest(account_id=account_id, topic=T, user_ids=["ana"])
    )
    assert not answer.recipients[0].known
    # A replica further behind than the change log reloads in full instead of guessing.
    await svc.account(account_id)
    await svc.user(account_id, "ana")
    assert await _email(replica, account_id) == (False, "account_default")
    for enabled in (False, True):
        await svc.prefs.SetPreference(
            preferences_pb2.SetPreferenceRequest(choice=choice(T, "email", enabled)),
            metadata=svc.auth(account_id, "ana"),
        )
    await pool.execute("delete from preferences.changes where account_id = $1", account_id)  # as if trimmed
    assert await _email(replica, account_id) == (True, "user")
    # A user created after the cache was filled is answered, not reported unknown.
    await svc.user(account_id, "zed")
    answer = await replica.EffectiveBatch(
        preferences_pb2.EffectiveBatchRequest(account_id=account_id, topic=T, user_ids=["zed", "zed"])
    )
    assert [(r.user_id, r.known) for r in answer.recipients] == [("zed", True), ("zed", True)]
