"""QueueAdmin over real gRPC on the email service: dead letters, requeue, stats, validation, super admins only."""

from __future__ import annotations

import asyncpg
import grpc
import pytest
from belfry import rpc, service
from belfry.api.queue.v1 import queue_pb2 as pb
from belfry.api.queue.v1 import queue_pb2_grpc as pb_grpc
from belfry.auth import TokenIssuer

from services.email.server import build_for
from services.email.settings import load_settings
from tests.conftest import client_tls
from tests.email.email_helpers import Capture, email_env, enqueue_messages, message, seed, wait_until_finished


async def test_dead_letters_listed_requeued_and_scoped_to_the_account(
    database_url: str,
    token_keys: dict[str, bytes],
    pool: asyncpg.Pool,
    smtp: tuple[Capture, int],
    directory: str,
    account_id: str,
) -> None:
    _, port = smtp
    await seed(directory, account_id, admin=(True, True))
    await seed(directory, account_id + "-other", admin=(True, True))
    settings = load_settings(email_env(database_url, token_keys, port, BELFRY_PREFERENCES_ADDRESS=directory))
    running = await service.start("email", settings.common, build_for(settings))
    channel = rpc.connect(f"127.0.0.1:{running.port}", client_tls())
    stub = pb_grpc.QueueAdminStub(channel)
    issuer = TokenIssuer(token_keys, "k1")
    mine = [("authorization", f"Bearer {issuer.issue(account_id, 'admin')}")]
    theirs = [("authorization", f"Bearer {issuer.issue(account_id + '-other', 'admin')}")]
    try:
        # A policy refusal (5.7.x): a requeue tries the address again (a 5.1.x one would suppress it).
        await enqueue_messages(pool, [message(account_id, user_id="r", recipient_email="policy@example.test")])
        [dead] = await wait_until_finished(pool, account_id, 1, states=("dead",))

        listed = await stub.ListDeadLetters(pb.ListDeadLettersRequest(channel="email"), metadata=mine)
        [letter] = listed.dead_letters
        assert letter.delivery_id == dead["delivery_id"] and letter.topic == "contacts.contact_assigned"
        assert letter.errors[0].attempt == 1 and "550" in letter.errors[0].error
        assert letter.errors[0].worker == settings.sender.worker_id

        other = await stub.ListDeadLetters(pb.ListDeadLettersRequest(), metadata=theirs)
        assert list(other.dead_letters) == []
        refused = await stub.Requeue(pb.RequeueRequest(delivery_ids=[dead["delivery_id"]]), metadata=theirs)
        assert list(refused.requeued) == [] and list(refused.not_dead) == [dead["delivery_id"]]

        stats = await stub.GetStats(pb.GetStatsRequest(), metadata=mine)
        assert {s.channel: dict(s.counts) for s in stats.channels} == {"email": {"dead": 1}}

        # Requeued: it is tried again (and refused again), the history grows.
        done = await stub.Requeue(pb.RequeueRequest(delivery_ids=[dead["delivery_id"]]), metadata=mine)
        assert list(done.requeued) == [dead["delivery_id"]]
        await wait_until_finished(pool, account_id, 1, states=("dead",))
        errors = await pool.fetchval(
            "select errors from queue.deliveries where account_id = $1 and state = 'dead'", account_id
        )
        # The first refusal, the requeue note, the second refusal.
        assert [("requeued_by" in e, "550" in e.get("error", "")) for e in errors] == [
            (False, True),
            (True, False),
            (False, True),
        ]

        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.ListDeadLetters(pb.ListDeadLettersRequest(page_size=5000), metadata=mine)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in (bad.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await stub.Requeue(pb.RequeueRequest(), metadata=mine)
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await stub.GetStats(pb.GetStatsRequest())
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await channel.close()
        await running.stop(0.1)


async def test_dead_letters_are_for_the_accounts_super_admins_only(
    database_url: str,
    token_keys: dict[str, bytes],
    pool: asyncpg.Pool,
    smtp: tuple[Capture, int],
    directory: str,
    account_id: str,
) -> None:
    """A valid token is not enough: its user must be an active super admin of the account, in the directory."""
    _, port = smtp
    await seed(directory, account_id, admin=(True, True), plain=(False, True), former=(True, False))
    settings = load_settings(email_env(database_url, token_keys, port, BELFRY_PREFERENCES_ADDRESS=directory))
    running = await service.start("email", settings.common, build_for(settings))
    channel = rpc.connect(f"127.0.0.1:{running.port}", client_tls())
    stub = pb_grpc.QueueAdminStub(channel)
    issuer = TokenIssuer(token_keys, "k1")
    try:
        await enqueue_messages(pool, [message(account_id, user_id="r", recipient_email="reject@example.test")])
        [dead] = await wait_until_finished(pool, account_id, 1, states=("dead",))

        async def call(name: str, meta: list[tuple[str, str]]) -> object:
            if name == "list":
                return await stub.ListDeadLetters(pb.ListDeadLettersRequest(), metadata=meta)
            if name == "requeue":
                return await stub.Requeue(pb.RequeueRequest(delivery_ids=[dead["delivery_id"]]), metadata=meta)
            return await stub.GetStats(pb.GetStatsRequest(), metadata=meta)

        # A user missing from the directory, an ordinary user, a super admin no longer active.
        for user_id, needle in (
            ("ghost", "not an active user"),
            ("plain", "super admins"),
            ("former", "not an active"),
        ):
            meta = [("authorization", f"Bearer {issuer.issue(account_id, user_id)}")]
            for name in ("list", "requeue", "stats"):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call(name, meta)
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, (user_id, name)
                assert needle in (refused.value.details() or ""), (user_id, name, refused.value.details())
        state = await pool.fetchval("select state from queue.deliveries where delivery_id = $1", dead["delivery_id"])
        assert state == "dead"  # nothing was requeued
        admin = [("authorization", f"Bearer {issuer.issue(account_id, 'admin')}")]
        listed = await stub.ListDeadLetters(pb.ListDeadLettersRequest(), metadata=admin)
        assert [d.delivery_id for d in listed.dead_letters] == [dead["delivery_id"]]
    finally:
        await channel.close()
        await running.stop(0.1)
