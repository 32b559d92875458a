"""Suppression import and expiry (issue 20, section 2) over real gRPC on the real email service.

An account's super admins import an existing list: every entry is checked and each refused one is named
with its reason, the others are stored; importing the same list again changes nothing; a call is bounded.
Soft-bounce entries lapse after BELFRY_EMAIL_SOFT_SUPPRESSION_SECONDS, hard bounces and complaints never.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from belfry import rpc, service
from belfry.api.email.v1 import email_pb2 as pb
from belfry.api.email.v1 import email_pb2_grpc as pb_grpc
from belfry.auth import TokenIssuer

from services.email import store
from services.email.server import build_for
from services.email.settings import load_settings
from tests.conftest import client_tls
from tests.email.email_helpers import Capture, email_env, enqueue_messages, message, seed, wait_until_finished

_ROWS = """select address, reason, detail, source_delivery, first_seen, last_seen
           from email.suppressions where account_id = $1 order by address"""


async def _rows(pool: asyncpg.Pool, account_id: str) -> list[tuple[Any, ...]]:
    return [tuple(r.values()) for r in await pool.fetch(_ROWS, account_id)]


async def _age(pool: asyncpg.Pool, account_id: str, address: str, days: float) -> None:
    """Move an entry's first and last sightings ``days`` into the past (the clock is PostgreSQL's)."""
    await pool.execute(
        """update email.suppressions set first_seen = first_seen - make_interval(secs => $3),
                  last_seen = last_seen - make_interval(secs => $3)
           where account_id = $1 and address = $2""",
        account_id,
        address,
        days * 86400.0,
    )


def _entry(address: str, reason: str = store.HARD_BOUNCE, detail: str = "") -> pb.SuppressionImport:
    return pb.SuppressionImport(address=address, reason=reason, detail=detail)


async def test_an_imported_list_is_checked_entry_by_entry_and_importing_it_again_changes_nothing(
    database_url: str,
    token_keys: dict[str, bytes],
    pool: asyncpg.Pool,
    smtp: tuple[Capture, int],
    directory: str,
    account_id: str,
) -> None:
    capture, port = smtp
    other_account = account_id + "-other"
    await seed(directory, account_id, admin=(True, True), plain=(False, True))
    await seed(directory, other_account, admin=(True, True))
    # What the account already learnt: a soft-bounce entry, a complaint, a hard bounce.
    await store.suppress(pool, account_id, "soft@example.test", store.SOFT_BOUNCES, "4.2.2 mailbox full", 11)
    await store.suppress(pool, account_id, "angry@example.test", store.COMPLAINT, "abuse", 13)
    await store.suppress(pool, account_id, "gone@example.test", store.HARD_BOUNCE, "550 5.1.1", 14)
    before = {r[0]: r for r in await _rows(pool, account_id)}

    settings = load_settings(email_env(database_url, token_keys, port, BELFRY_PREFERENCES_ADDRESS=directory))
    running = await service.start("email", settings.common, build_for(settings))
    channel = rpc.connect(f"127.0.0.1:{running.port}", client_tls())
    stub = pb_grpc.DeliverabilityStub(channel)
    issuer = TokenIssuer(token_keys, "k1")
    admin = [("authorization", f"Bearer {issuer.issue(account_id, 'admin')}")]
    request = pb.ImportSuppressionsRequest(
        entries=[
            _entry("new@example.test", detail="from OldMailer, 2026-11"),  # 0
            _entry("  Upper@Example.TEST ", store.COMPLAINT),  # 1
            _entry("not an address"),  # 2
            _entry("a@example.test, b@example.test"),  # 3
            _entry("x@example.test", "unsubscribed"),  # 4
            _entry("NEW@example.test"),  # 5
            _entry("soft@example.test"),  # 6: soft bounces -> hard bounce
            _entry("soft@example.test", store.SOFT_BOUNCES),  # 7: same address as 6
            _entry("angry@example.test"),  # 8: complaint -> hard bounce
            _entry("gone@example.test", store.COMPLAINT),  # 9: a hard bounce is not weakened
            _entry(""),  # 10
            _entry("z@example.test", detail="two\nlines"),  # 11
            _entry("later@example.test", store.SOFT_BOUNCES),  # 12
            _entry("angry@example.test", store.COMPLAINT),  # 13: same address as 8
            _entry("sarah@localhost"),  # 14: no dotted domain
        ]
    )
    try:
        done = await stub.ImportSuppressions(request, metadata=admin)
        assert list(done.added) == ["later@example.test", "new@example.test", "upper@example.test"]
        assert list(done.updated) == ["angry@example.test", "soft@example.test"]
        assert list(done.unchanged) == ["gone@example.test"]
        refused = {r.index: (r.address, r.why) for r in done.refused}
        assert sorted(refused) == [2, 3, 4, 5, 7, 10, 11, 13, 14]
        assert refused[2][0] == "not an address" and "local@domain" in refused[2][1]
        assert "local@domain" in refused[3][1] and "local@domain" in refused[14][1]
        assert "reason must be one of" in refused[4][1] and "'unsubscribed'" in refused[4][1]
        assert refused[5][1] == "the same address as entry 0"
        assert refused[7][1] == "the same address as entry 6"
        assert refused[10][1] == "address is empty"
        assert "one line" in refused[11][1]
        assert refused[13][1] == "the same address as entry 8"

        after = {r[0]: r for r in await _rows(pool, account_id)}
        assert set(after) == {
            "angry@example.test",
            "gone@example.test",
            "later@example.test",
            "new@example.test",
            "soft@example.test",
            "upper@example.test",
        }
        assert after["new@example.test"][1:4] == ("hard bounce", "imported by admin: from OldMailer, 2026-11", None)
        assert after["upper@example.test"][1:3] == ("complaint", "imported by admin")
        assert after["gone@example.test"] == before["gone@example.test"]  # untouched
        for address, reason in (("soft@example.test", "hard bounce"), ("angry@example.test", "hard bounce")):
            # Reason and detail replaced; first seen and the source delivery kept; seen again now.
            row, old = after[address], before[address]
            assert (row[1], row[2]) == (reason, "imported by admin"), address
            assert (row[3], row[4]) == (old[3], old[4]), address
            assert row[5] > old[5], address

        # The same list again: nothing added or changed, the same refusals, not one row different.
        again = await stub.ImportSuppressions(request, metadata=admin)
        assert (list(again.added), list(again.updated)) == ([], [])
        assert list(again.unchanged) == sorted(after)
        assert [(r.index, r.address, r.why) for r in again.refused] == [
            (r.index, r.address, r.why) for r in done.refused
        ]
        assert {r[0]: r for r in await _rows(pool, account_id)} == after

        # The sender honours imported entries: nothing reaches SMTP for them.
        sent_before = len(capture.snapshot())
        await enqueue_messages(pool, [message(account_id, user_id="n", recipient_email="New@example.test")])
        [dropped] = await wait_until_finished(pool, account_id, 1, states=("dropped",))
        assert [e["error"] for e in dropped["errors"]] == ["address suppressed (hard bounce)"]
        assert len(capture.snapshot()) == sent_before

        # An imported soft-bounce entry lapses like a learnt one; the list says when.
        listed = await stub.ListSuppressions(pb.ListSuppressionsRequest(search="later@"), metadata=admin)
        [later] = listed.suppressions
        expiry = later.expires_at.ToDatetime() - later.last_seen.ToDatetime()
        assert expiry == timedelta(seconds=settings.soft_expiry_seconds)

        # The import is the caller's account's only.
        theirs = [("authorization", f"Bearer {issuer.issue(other_account, 'admin')}")]
        other = await stub.ImportSuppressions(
            pb.ImportSuppressionsRequest(entries=[_entry("gone@example.test", store.COMPLAINT)]), metadata=theirs
        )
        assert list(other.added) == ["gone@example.test"]
        assert [r[:2] for r in await _rows(pool, other_account)] == [("gone@example.test", "complaint")]
        assert {r[0]: r for r in await _rows(pool, account_id)} == after
    finally:
        await channel.close()
        await running.stop(0.1)
        await pool.execute("delete from queue.deliveries where account_id = $1", account_id)


async def test_an_import_suppresses_a_lapsed_soft_bounce_entry_again_and_never_weakens_one(
    pool: asyncpg.Pool, account_id: str
) -> None:
    """The store's merge rule, entry by entry (no service runs here, so no purge removes the lapsed entry)."""
    week = 7 * 86400.0
    for address, reason in (
        ("lapsed@example.test", store.SOFT_BOUNCES),
        ("active@example.test", store.SOFT_BOUNCES),
        ("complaint@example.test", store.COMPLAINT),
        ("hard@example.test", store.HARD_BOUNCE),
    ):
        await store.suppress(pool, account_id, address, reason, "learnt", 7)
    await _age(pool, account_id, "lapsed@example.test", 8)
    before = {r[0]: r for r in await _rows(pool, account_id)}
    listed = await store.list_suppressions(
        pool, account_id, search="", after_address="", limit=10, soft_expiry_seconds=week
    )
    assert "lapsed@example.test" not in {s.address for s in listed} and len(listed) == 3  # lapsed: not in force
    entries = [
        ("lapsed@example.test", store.SOFT_BOUNCES, "imported"),  # lapsed: in force again, seen now
        ("active@example.test", store.SOFT_BOUNCES, "imported"),  # in force: left as it was
        ("complaint@example.test", store.SOFT_BOUNCES, "imported"),  # never weakened to one that lapses
        ("hard@example.test", store.COMPLAINT, "imported"),  # never weakened to one that spares locked topics
    ]
    done = await store.import_suppressions(pool, account_id, entries, soft_expiry_seconds=week)
    assert (done.added, done.updated) == ([], ["lapsed@example.test"])
    assert done.unchanged == ["active@example.test", "complaint@example.test", "hard@example.test"]
    after = {r[0]: r for r in await _rows(pool, account_id)}
    assert {a: r for a, r in after.items() if a != "lapsed@example.test"} == {
        a: r for a, r in before.items() if a != "lapsed@example.test"
    }
    lapsed, old = after["lapsed@example.test"], before["lapsed@example.test"]
    assert lapsed[1:4] == ("soft bounces", "imported", 7) and lapsed[4] == old[4] and lapsed[5] > old[5]
    in_force = await store.suppressed(pool, [(account_id, "lapsed@example.test")], soft_expiry_seconds=week)
    assert in_force == {(account_id, "lapsed@example.test"): store.SOFT_BOUNCES}
    again = await store.import_suppressions(pool, account_id, entries, soft_expiry_seconds=week)
    assert (again.added, again.updated, len(again.unchanged)) == ([], [], 4)
    assert {r[0]: r for r in await _rows(pool, account_id)} == after


async def test_an_import_is_bounded_and_refused_calls_write_nothing(
    database_url: str,
    token_keys: dict[str, bytes],
    pool: asyncpg.Pool,
    smtp: tuple[Capture, int],
    directory: str,
    account_id: str,
) -> None:
    _, port = smtp
    await seed(directory, account_id, admin=(True, True), plain=(False, True), former=(True, False))
    settings = load_settings(email_env(database_url, token_keys, port, BELFRY_PREFERENCES_ADDRESS=directory))
    running = await service.start("email", settings.common, build_for(settings))
    channel = rpc.connect(f"127.0.0.1:{running.port}", client_tls())
    stub = pb_grpc.DeliverabilityStub(channel)
    issuer = TokenIssuer(token_keys, "k1")
    admin = [("authorization", f"Bearer {issuer.issue(account_id, 'admin')}")]
    entries = [_entry(f"bulk{i}@example.test") for i in range(1001)]
    try:
        for count in (0, 1001):
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.ImportSuppressions(pb.ImportSuppressionsRequest(entries=entries[:count]), metadata=admin)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = bad.value.details() or ""
            assert "entries" in details and f"got {count}" in details and "at most 1000" in details, details
        for user_id in ("plain", "former", "ghost"):
            meta = [("authorization", f"Bearer {issuer.issue(account_id, user_id)}")]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ImportSuppressions(pb.ImportSuppressionsRequest(entries=entries[:3]), metadata=meta)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, user_id
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await stub.ImportSuppressions(pb.ImportSuppressionsRequest(entries=entries[:3]))
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert await _rows(pool, account_id) == []

        # The bound itself is accepted, in one call.
        done = await stub.ImportSuppressions(pb.ImportSuppressionsRequest(entries=entries[:1000]), metadata=admin)
        assert len(done.added) == 1000 and not done.refused
        assert await pool.fetchval("select count(*) from email.suppressions where account_id = $1", account_id) == 1000
    finally:
        await channel.close()
        await running.stop(0.1)


async def test_soft_bounce_entries_lapse_by_the_configured_policy_and_the_others_never(
    database_url: str,
    token_keys: dict[str, bytes],
    pool: asyncpg.Pool,
    smtp: tuple[Capture, int],
    directory: str,
    account_id: str,
) -> None:
    capture, port = smtp
    await seed(directory, account_id, admin=(True, True))
    for address, reason, days in (
        ("soft-old@example.test", store.SOFT_BOUNCES, 4),  # past the 3 days configured below
        ("soft-new@example.test", store.SOFT_BOUNCES, 2),
        ("hard-old@example.test", store.HARD_BOUNCE, 400),
        ("complaint-old@example.test", store.COMPLAINT, 400),
    ):
        await store.suppress(pool, account_id, address, reason, "learnt", None)
        await _age(pool, account_id, address, days)
    env = email_env(
        database_url,
        token_keys,
        port,
        BELFRY_PREFERENCES_ADDRESS=directory,
        BELFRY_EMAIL_SOFT_SUPPRESSION_SECONDS=str(3 * 86400),
    )
    settings = load_settings(env)
    running = await service.start("email", settings.common, build_for(settings))
    channel = rpc.connect(f"127.0.0.1:{running.port}", client_tls())
    stub = pb_grpc.DeliverabilityStub(channel)
    admin = [("authorization", f"Bearer {TokenIssuer(token_keys, 'k1').issue(account_id, 'admin')}")]

    async def purged() -> None:
        # The purge runs when the service starts, then hourly.
        while await pool.fetchval(  # noqa: ASYNC110 - the purge's effect is in the database
            "select count(*) from email.suppressions where account_id = $1 and address = 'soft-old@example.test'",
            account_id,
        ):
            await asyncio.sleep(0.05)

    try:
        listed = await stub.ListSuppressions(pb.ListSuppressionsRequest(), metadata=admin)
        shown = {s.address: s for s in listed.suppressions}
        assert sorted(shown) == ["complaint-old@example.test", "hard-old@example.test", "soft-new@example.test"]
        soft = shown["soft-new@example.test"]
        assert soft.expires_at.ToDatetime() - soft.last_seen.ToDatetime() == timedelta(days=3)
        assert not shown["hard-old@example.test"].HasField("expires_at")
        assert not shown["complaint-old@example.test"].HasField("expires_at")

        await asyncio.wait_for(purged(), timeout=60)
        left = await pool.fetch("select address from email.suppressions where account_id = $1", account_id)
        assert len(left) == 3

        await enqueue_messages(
            pool,
            [
                message(account_id, user_id=name, recipient_email=f"{name}@example.test")
                for name in ("soft-old", "soft-new", "hard-old", "complaint-old")
            ],
        )
        done = {d["user_id"]: d for d in await wait_until_finished(pool, account_id, 4)}
        assert {u: d["state"] for u, d in done.items()} == {
            "soft-old": "sent",
            "soft-new": "dropped",
            "hard-old": "dropped",
            "complaint-old": "dropped",
        }
        assert [c.rcpt_tos for c in capture.snapshot()] == [["soft-old@example.test"]]
    finally:
        await channel.close()
        await running.stop(0.1)
        await pool.execute("delete from queue.deliveries where account_id = $1", account_id)
