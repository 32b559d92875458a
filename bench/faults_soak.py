"""Soak with faults: the email and webhooks senders keep their books while things break under them.

Runs ``python -m services.email`` and ``python -m services.webhooks`` as real
processes on a private PostgreSQL cluster (Debian's ``pg_ctl``, the fault
kit in ``tests/faults``), each behind a TCP fault proxy to the database; the
email sender reaches an aiosmtpd sink through another proxy, the webhooks
sender an HTTPS endpoint (the kit's hostile peer, answering 200 unless a
fault says otherwise). A producer enqueues steadily while, every
``--fault-every`` seconds, one fault from a fixed rotation is injected:
PostgreSQL ``pg_ctl restart -m immediate``, connection resets (database and
SMTP), a refused database, an SMTP blackhole, database latency, SIGKILL of
either sender (restarted at once, as an orchestrator would), and webhook
endpoints resetting every connection. A sender that exits on its own is
restarted too and counted as an unexpected exit.

Afterwards faults stop, the queue drains, and it reports per channel
``accepted = sent + dead + dropped + expired`` (anything still queued or
leased is printed as not final) and the handoffs: how many deliveries the
sink or endpoint received more than once, the most copies of one delivery,
and any delivery received more often than it was attempted (must be none).

Usage: python bench/faults_soak.py [--minutes 30] [--rate 20] [--hook-rate 5] [--fault-every 15]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import platform
import random
import re
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from aiosmtpd.controller import Controller
from belfry import db, rpc
from belfry.api.webhooks.v1 import webhooks_pb2 as pb
from belfry.api.webhooks.v1 import webhooks_pb2_grpc as pb_grpc
from belfry.auth import TokenIssuer
from belfry.queue import NewDelivery, enqueue

from tests.conftest import client_tls, fresh_database
from tests.email.email_helpers import message
from tests.faults.conftest import via_port
from tests.faults.hostile import Answer, HostilePeer, Reset
from tests.faults.ledger import FINAL, Ledger, books
from tests.faults.postgres import PrivatePostgres, free_port
from tests.faults.processes import ServiceProcess
from tests.faults.proxy import FaultProxy
from tests.faults.senders import email_process_env, webhooks_process_env
from tests.push.fakes.tls import make_pki

TOKEN_KEYS = {"k1": b"k1-secret-for-the-fault-soak-0123456789abcdef"}
EMAIL_ACCOUNTS = [f"soak_mail_{i}" for i in range(4)]
HOOK_ACCOUNT = "soak_hooks"
HOOK_USERS = 20
_MESSAGE_ID = re.compile(rb"^Message-ID:\s*<delivery-(\d+)\.", re.IGNORECASE | re.MULTILINE)
_AWAY = (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError)


class CountingSink:
    """An aiosmtpd handler that keeps only how often each delivery id arrived (a long soak keeps no bodies)."""

    def __init__(self) -> None:
        self.handoffs: collections.Counter[int] = collections.Counter()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's hook name
        """Count the Message-ID's delivery id; accept."""
        found = _MESSAGE_ID.search(envelope.original_content or envelope.content)
        if found:
            self.handoffs[int(found.group(1))] += 1
        return "250 2.0.0 accepted"


@dataclass
class Supervised:
    """A sender process kept running: restarted after our SIGKILLs and after exits of its own."""

    name: str
    env: dict[str, str]
    process: ServiceProcess | None = None
    kills: int = 0
    unexpected_exits: int = 0
    cpu_done: float = 0.0  # CPU seconds of processes that have ended
    _cpu_last: float = 0.0
    _watch: asyncio.Task[None] | None = None
    last_tail: str = ""

    async def start(self) -> None:
        """Start the process and its watcher."""
        self.process = await ServiceProcess.start(self.name, self.env)
        self._cpu_last = 0.0
        self._watch = asyncio.create_task(self._watch_it(self.process))

    async def _watch_it(self, process: ServiceProcess) -> None:
        ps = psutil.Process(process.pid)
        while process.alive:
            with contextlib.suppress(psutil.Error):
                times = ps.cpu_times()
                self._cpu_last = times.user + times.system
            await asyncio.sleep(1.0)
        if process is self.process:  # it exited without being asked to
            self.unexpected_exits += 1
            self.last_tail = process.tail()
            self.cpu_done += self._cpu_last
            await self.start()

    async def sigkill(self) -> None:
        """SIGKILL the process and start another at once."""
        process, self.process = self.process, None
        if process is not None:
            await process.kill()
            self.cpu_done += self._cpu_last
        self.kills += 1
        await self.start()

    async def stop(self) -> None:
        """Stop for good (SIGTERM, drain)."""
        process, self.process = self.process, None
        if process is not None:
            await process.stop()
            self.cpu_done += self._cpu_last
        if self._watch is not None:
            self._watch.cancel()

    @property
    def port(self) -> int:
        """The current process's gRPC port."""
        assert self.process is not None
        return self.process.port


@dataclass
class Faults:
    """Everything a fault may act on, and how many of each kind were injected."""

    pg: PrivatePostgres
    pg_proxies: list[FaultProxy]
    smtp: FaultProxy
    peer: HostilePeer
    email: Supervised
    hooks: Supervised
    injected: collections.Counter[str] = field(default_factory=collections.Counter)

    def rotation(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        """The faults, in the order they are injected (then again)."""
        return [
            ("postgres immediate restart", self.pg_restart),
            ("smtp connections reset", self.smtp_reset),
            ("email sender SIGKILL", self.email.sigkill),
            ("postgres connections reset", self.pg_reset),
            ("webhook endpoint resets for 3 s", self.peer_resets),
            ("smtp blackhole for 3 s", self.smtp_blackhole),
            ("webhooks sender SIGKILL", self.hooks.sigkill),
            ("postgres refused for 2 s", self.pg_refused),
            ("postgres latency 50 ms for 5 s", self.pg_latency),
        ]

    async def pg_restart(self) -> None:
        await self.pg.restart(mode="immediate")

    async def smtp_reset(self) -> None:
        self.smtp.reset_all()

    async def pg_reset(self) -> None:
        for proxy in self.pg_proxies:
            proxy.reset_all()

    async def peer_resets(self) -> None:
        self.peer.default = Reset()
        await asyncio.sleep(3)
        self.peer.default = Answer(200)

    async def smtp_blackhole(self) -> None:
        self.smtp.blackhole = True
        await asyncio.sleep(3)
        self.smtp.blackhole = False

    async def pg_refused(self) -> None:
        for proxy in self.pg_proxies:
            await proxy.refuse(True)
            proxy.reset_all()
        await asyncio.sleep(2)
        for proxy in self.pg_proxies:
            await proxy.refuse(False)

    async def pg_latency(self) -> None:
        for proxy in self.pg_proxies:
            proxy.latency = 0.05
        await asyncio.sleep(5)
        for proxy in self.pg_proxies:
            proxy.latency = 0.0

    async def inject(self, stop: asyncio.Event, every: float) -> None:
        """One fault every ``every`` seconds until ``stop``."""
        order = self.rotation()
        turn = 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
            if stop.is_set():
                return
            name, act = order[turn % len(order)]
            turn += 1
            await act()
            self.injected[name] += 1
            print(f"  {time.strftime('%H:%M:%S')} fault: {name}", flush=True)


@dataclass
class Producer:
    """Enqueues at a steady rate, as the dispatcher would; a batch refused by a down database is counted, not retried."""

    pool: asyncpg.Pool
    rate: float
    hook_rate: float
    confirmed: collections.Counter[str] = field(default_factory=collections.Counter)
    refused: int = 0
    _n: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Every half second, one transaction per channel."""
        rng = random.Random(7)
        carry = {"email": 0.0, "other_apps": 0.0}
        while not stop.is_set():
            expires = datetime.now(UTC) + timedelta(hours=2)
            for channel, rate in (("email", self.rate), ("other_apps", self.hook_rate)):
                carry[channel] += rate / 2
                count, carry[channel] = int(carry[channel]), carry[channel] - int(carry[channel])
                rows = [self._row(channel, rng, expires) for _ in range(count)]
                if rows:
                    await self._commit(channel, rows)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    def _row(self, channel: str, rng: random.Random, expires: datetime) -> NewDelivery:
        self._n += 1
        if channel == "email":
            account, user = rng.choice(EMAIL_ACCOUNTS), f"u{self._n}"
        else:
            account, user = HOOK_ACCOUNT, f"h{rng.randrange(HOOK_USERS)}"
        msg = message(account, user_id=user)
        return NewDelivery(account, uuid.UUID(msg.notification_id), user, channel, msg.topic, msg.to_json(), expires)

    async def _commit(self, channel: str, rows: list[NewDelivery]) -> None:
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await enqueue(conn, rows)
        except _AWAY:
            self.refused += len(rows)  # not accepted (or, if the commit's answer was lost, counted from the table)
            return
        self.confirmed[channel] += len(rows)


async def connect_hooks(port: int, peer: HostilePeer) -> None:
    """One webhook per soak user, connected through the webhooks service's API."""
    issuer = TokenIssuer(TOKEN_KEYS, "k1")
    async with rpc.connect(f"127.0.0.1:{port}", client_tls()) as channel:
        stub = pb_grpc.WebhooksStub(channel)
        for i in range(HOOK_USERS):
            token = issuer.issue(HOOK_ACCOUNT, f"h{i}")
            await stub.ConnectWebhook(
                pb.ConnectWebhookRequest(url=peer.url(f"/hook/{i}"), label="soak"),
                metadata=[("authorization", f"Bearer {token}")],
            )


async def unfinished(pool: asyncpg.Pool) -> int:
    """Deliveries not yet in a final state (retrying while the database is away)."""
    for _ in range(100):
        try:
            return int(
                await pool.fetchval("select count(*) from queue.deliveries where state <> all($1::text[])", list(FINAL))
            )
        except _AWAY:
            await asyncio.sleep(0.1)
    raise RuntimeError("the database never came back")


def report(title: str, ledgers: list[Ledger], confirmed: int) -> None:
    """Print one channel's books."""
    states: collections.Counter[str] = collections.Counter()
    handoffs: collections.Counter[int] = collections.Counter()
    over: dict[int, tuple[int, int]] = {}
    sent_missing = 0
    for book in ledgers:
        states.update(book.by_state)
        handoffs.update(book.handoffs)
        over.update(book.over_attempts)
        sent_missing += len(book.sent_not_at_sink)
    accepted = sum(states.values())
    final = {s: states[s] for s in FINAL}
    not_final = accepted - sum(final.values())
    dup = [n for n in handoffs.values() if n > 1]
    print(f"{title}: accepted {accepted} (producer saw {confirmed} commits confirmed)")
    print("  = " + " + ".join(f"{s} {n}" for s, n in final.items()) + f"   [not final: {not_final}]")
    print(
        f"  received: {sum(handoffs.values())} copies of {len(handoffs)} deliveries;"
        f" {len(dup)} delivered more than once (max {max(handoffs.values(), default=0)} copies);"
        f" over their attempts: {len(over)}; sent but never received: {sent_missing}"
    )
    if over:
        print(f"  OVER ATTEMPTS (delivery: copies, attempts): {dict(list(over.items())[:10])}")


async def main() -> None:
    """Run the soak and print the books."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=20.0, help="email deliveries enqueued per second")
    parser.add_argument("--hook-rate", type=float, default=5.0, help="webhook deliveries enqueued per second")
    parser.add_argument("--fault-every", type=float, default=15.0, help="seconds between faults")
    parser.add_argument("--drain-minutes", type=float, default=10.0, help="how long to wait for the queue to drain")
    args = parser.parse_args()
    pg = await PrivatePostgres.create()
    sink = CountingSink()
    smtp_port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    try:
        async with fresh_database(pg.admin_dsn) as url, contextlib.AsyncExitStack() as stack:
            pool = await db.create_pool(url, application_name="bench-faults-soak", min_size=1, max_size=4)
            conn = await pool.acquire()
            server = await conn.fetchval("show server_version")
            await pool.release(conn)
            pki = make_pki(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="belfry-soak-pki-"))))
            print(
                f"Python {platform.python_version()}, PostgreSQL {server} (private cluster, fsync off),"
                f" asyncpg {metadata.version('asyncpg')}, grpcio {metadata.version('grpcio')},"
                f" aiosmtpd {metadata.version('aiosmtpd')}, httpx {metadata.version('httpx')}"
            )
            print(
                f"minutes={args.minutes} email rate={args.rate}/s webhooks rate={args.hook_rate}/s"
                f" fault every {args.fault_every}s",
                flush=True,
            )
            async with (
                FaultProxy("127.0.0.1", pg.port) as pg_email,
                FaultProxy("127.0.0.1", pg.port) as pg_hooks,
                FaultProxy("127.0.0.1", smtp_port) as smtp,
                HostilePeer(ssl_context=pki.server_context()) as peer,
            ):
                email = Supervised(
                    "email",
                    email_process_env(
                        via_port(url, pg_email.port),
                        TOKEN_KEYS,
                        smtp.port,
                        BELFRY_EMAIL_LEASE_SECONDS="10",
                        BELFRY_DB_POOL_MAX="6",
                        BELFRY_DRAIN_SECONDS="2",
                    ),
                )
                hooks = Supervised(
                    "webhooks",
                    webhooks_process_env(
                        via_port(url, pg_hooks.port),
                        TOKEN_KEYS,
                        pki,
                        peer.port,
                        BELFRY_WEBHOOKS_LEASE_SECONDS="10",
                        BELFRY_WEBHOOKS_TIMEOUT_SECONDS="3",
                        BELFRY_DRAIN_SECONDS="2",
                    ),
                )
                await email.start()
                await hooks.start()
                await connect_hooks(hooks.port, peer)
                faults = Faults(pg, [pg_email, pg_hooks], smtp, peer, email, hooks)
                producer = Producer(pool, args.rate, args.hook_rate)
                stop = asyncio.Event()
                started = time.monotonic()
                tasks = [
                    asyncio.create_task(producer.run(stop)),
                    asyncio.create_task(faults.inject(stop, args.fault_every)),
                ]
                await asyncio.sleep(args.minutes * 60)
                stop.set()
                await asyncio.gather(*tasks)
                soaked = time.monotonic() - started
                print(f"faults stopped after {soaked:.0f} s; draining", flush=True)
                await pool.expire_connections()
                deadline = time.monotonic() + args.drain_minutes * 60
                left = await unfinished(pool)
                while left and time.monotonic() < deadline:
                    await asyncio.sleep(1)  # polling the table: retries become due by time, not by an event
                    left = await unfinished(pool)
                print(f"drained in {time.monotonic() - started - soaked:.0f} s ({left} not final)")
                await email.stop()
                await hooks.stop()
            hook_handoffs = collections.Counter(
                int(r.headers["x-belfry-delivery-id"]) for r in peer.requests if "x-belfry-delivery-id" in r.headers
            )
            print(f"faults injected: {sum(faults.injected.values())} — {dict(faults.injected)}")
            report(
                "email",
                [await books(pool, a, sink.handoffs) for a in EMAIL_ACCOUNTS],
                producer.confirmed["email"],
            )
            report(
                "webhooks",
                [await books(pool, HOOK_ACCOUNT, hook_handoffs, "other_apps")],
                producer.confirmed["other_apps"],
            )
            print(f"enqueue transactions refused while the database was away: {producer.refused} deliveries")
            for s in (email, hooks):
                print(
                    f"{s.name}: SIGKILLed {s.kills}, exited on its own {s.unexpected_exits},"
                    f" CPU {s.cpu_done:.1f} s over the run"
                )
                if s.unexpected_exits:
                    print(f"  last unexpected exit:\n{s.last_tail[-2000:]}")
            await pool.close()
    finally:
        controller.stop()
        await pg.destroy()


if __name__ == "__main__":
    # The soak's own pool warns with a traceback each time PostgreSQL restarts under it: expected here.
    logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)
    asyncio.run(main())
