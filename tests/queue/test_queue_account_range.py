"""A queue bound to an account range claims, rescues and expires only its accounts' deliveries (sharding)."""

from __future__ import annotations

import asyncpg
import pytest
from belfry.config import AccountRange, Env, account_range
from belfry.errors import ConfigError
from belfry.queue import Queue

from tests.queue.queue_helpers import delivery, put


async def test_two_ranges_share_the_accounts_between_them_and_touch_nothing_else(
    pool: asyncpg.Pool, account_id: str
) -> None:
    accounts = [f"{account_id}_{s}" for s in "abcd"]
    await put(pool, [delivery(a, "other_apps", user_id=f"u{i}") for a in accounts for i in range(3)])
    # [_a, _c) and [_c, _e): every account of this test in exactly one of them, no other test's account in either.
    low = Queue(pool, "other_apps", worker="low", accounts=AccountRange(accounts[0], f"{account_id}_c"))
    high = Queue(pool, "other_apps", worker="high", accounts=AccountRange(f"{account_id}_c", f"{account_id}_e"))
    low_leases = await low.claim(100)
    high_leases = await high.claim(100)
    assert sorted({x.account_id for x in low_leases}) == accounts[:2] and len(low_leases) == 6
    assert sorted({x.account_id for x in high_leases}) == accounts[2:] and len(high_leases) == 6
    assert await low.claim(100) == []  # nothing left in its range, though the other range's rows exist
    # Expired leases are rescued by their own range only.
    await pool.execute(
        "update queue.deliveries set lease_expires_at = now() - interval '1 second' where account_id like $1 || '_%'",
        account_id,
    )
    assert await high.rescue() == 6
    assert await low.rescue() == 6
    # And a delivery past its time to live is expired by its own range only.
    await pool.execute(
        "update queue.deliveries set expires_at = now() - interval '1 second' where account_id = $1", accounts[0]
    )
    assert await high.expire() == 0
    assert await low.expire() == 3


def test_the_range_setting_is_parsed_and_checked() -> None:
    assert account_range(Env({})) == AccountRange()
    assert account_range(Env({"BELFRY_ACCOUNT_RANGE": "acc_4..acc_8"})) == AccountRange("acc_4", "acc_8")
    open_ended = account_range(Env({"BELFRY_ACCOUNT_RANGE": "acc_8.."}))
    assert "acc_9" in open_ended and "acc_7" not in open_ended and "zzz" in open_ended
    assert "acc_4" in AccountRange("acc_4", "acc_8") and "acc_8" not in AccountRange("acc_4", "acc_8")
    for bad in ("acc_4", "acc_8..acc_4", "acc_4..acc_4"):
        env = Env({"BELFRY_ACCOUNT_RANGE": bad})
        account_range(env)
        with pytest.raises(ConfigError, match="BELFRY_ACCOUNT_RANGE"):
            env.check()
