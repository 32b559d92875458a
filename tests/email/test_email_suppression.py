"""Suppression (issue 20): a 5.1.x reply at RCPT suppresses the address; suppressed addresses are
skipped before any SMTP traffic; super admins list, search and lift suppressions over real gRPC."""

from __future__ import annotations

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


async def test_mailbox_replies_suppress_policy_and_temporary_ones_do_not(
    database_url: str,
    token_keys: dict[str, bytes],
    pool: asyncpg.Pool,
    smtp: tuple[Capture, int],
    directory: str,
    account_id: str,
) -> None:
    capture, port = smtp
    await seed(directory, account_id, admin=(True, True), plain=(False, True))
    settings = load_settings(email_env(database_url, token_keys, port, BELFRY_PREFERENCES_ADDRESS=directory))
    running = await service.start("email", settings.common, build_for(settings))
    channel = rpc.connect(f"127.0.0.1:{running.port}", client_tls())
    stub = pb_grpc.DeliverabilityStub(channel)
    issuer = TokenIssuer(token_keys, "k1")
    admin = [("authorization", f"Bearer {issuer.issue(account_id, 'admin')}")]
    try:
        first = [
            message(account_id, user_id="r", recipient_email="reject@example.test"),
            message(account_id, user_id="p", recipient_email="policy@example.test"),
            message(account_id, user_id="t", recipient_email="tempfail@example.test"),
        ]
        await enqueue_messages(pool, first)
        dead = await wait_until_finished(pool, account_id, 2, states=("dead",))
        await wait_until_finished(pool, account_id, 1, states=("queued",))
        [rejected] = [d for d in dead if d["user_id"] == "r"]

        # Only the mailbox that does not exist is suppressed, with the server's reply.
        listed = await stub.ListSuppressions(pb.ListSuppressionsRequest(), metadata=admin)
        [entry] = listed.suppressions
        assert entry.address == "reject@example.test" and entry.reason == "hard bounce"
        assert entry.detail == "550 5.1.1 no such mailbox here"
        assert entry.source_delivery_id == rejected["delivery_id"]
        assert listed.next_after_address == ""

        # Mailed again (another case): dropped before any SMTP traffic, the reason in its history.
        await pool.execute("delete from queue.deliveries where account_id = $1", account_id)
        before = len(capture.snapshot())
        await enqueue_messages(pool, [message(account_id, user_id="r2", recipient_email="Reject@Example.test")])
        [dropped] = await wait_until_finished(pool, account_id, 1, states=("dropped",))
        assert [e["error"] for e in dropped["errors"]] == ["address suppressed (hard bounce)"]
        assert dropped["attempts"] == 1

        # A complaint stops notifications, but not the locked account topics (support, billing).
        await store.suppress(pool, account_id, "angry@example.test", store.COMPLAINT, "abuse", None)
        await pool.execute("delete from queue.deliveries where account_id = $1", account_id)
        await enqueue_messages(
            pool,
            [
                message(account_id, user_id="a1", recipient_email="angry@example.test"),
                message(account_id, user_id="a2", recipient_email="angry@example.test", locked=True),
                message(account_id, user_id="r3", recipient_email="reject@example.test", locked=True),
            ],
        )
        done = {d["user_id"]: d for d in await wait_until_finished(pool, account_id, 3)}
        assert {u: d["state"] for u, d in done.items()} == {"a1": "dropped", "a2": "sent", "r3": "dropped"}
        assert [c.rcpt_tos for c in capture.snapshot()[before:]] == [["angry@example.test"]]

        # Search, pages, lift; the lifted address is tried again.
        found = await stub.ListSuppressions(pb.ListSuppressionsRequest(search="ANGRY"), metadata=admin)
        assert [s.address for s in found.suppressions] == ["angry@example.test"]
        page = await stub.ListSuppressions(pb.ListSuppressionsRequest(page_size=1), metadata=admin)
        assert [s.address for s in page.suppressions] == ["angry@example.test"]
        rest = await stub.ListSuppressions(
            pb.ListSuppressionsRequest(page_size=1, after_address=page.next_after_address), metadata=admin
        )
        assert [s.address for s in rest.suppressions] == ["reject@example.test"]
        lifted = await stub.RemoveSuppressions(
            pb.RemoveSuppressionsRequest(addresses=["ANGRY@example.test", "nobody@example.test"]), metadata=admin
        )
        assert list(lifted.removed) == ["angry@example.test"]
        assert list(lifted.not_suppressed) == ["nobody@example.test"]
        await pool.execute("delete from queue.deliveries where account_id = $1", account_id)
        await enqueue_messages(pool, [message(account_id, user_id="a3", recipient_email="angry@example.test")])
        [again] = await wait_until_finished(pool, account_id, 1)
        assert again["state"] == "sent"

        # Another account does not see (or lift) this account's list; ordinary users are refused.
        await seed(directory, account_id + "-other", admin=(True, True))
        theirs = [("authorization", f"Bearer {issuer.issue(account_id + '-other', 'admin')}")]
        assert list((await stub.ListSuppressions(pb.ListSuppressionsRequest(), metadata=theirs)).suppressions) == []
        other = await stub.RemoveSuppressions(
            pb.RemoveSuppressionsRequest(addresses=["reject@example.test"]), metadata=theirs
        )
        assert list(other.removed) == []
        plain = [("authorization", f"Bearer {issuer.issue(account_id, 'plain')}")]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListSuppressions(pb.ListSuppressionsRequest(), metadata=plain)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.RemoveSuppressions(pb.RemoveSuppressionsRequest(), metadata=admin)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "addresses" in (bad.value.details() or "")
    finally:
        await channel.close()
        await running.stop(0.1)
        await pool.execute("delete from queue.deliveries where account_id = $1", account_id)
