"""Benchmark: EffectiveBatch for 1,000 recipients in one call (goal: under 20 ms warm).

Starts the preferences service as its own process (the supervisor of
``belfry up``) on a fresh database of the local PostgreSQL, seeds an
enterprise account with 1,000 users (a tenth with their own choices, a role
profile and an account default for the topic), then alternates, per round:

* Belfry: ``EffectiveBatch`` (1,000 user ids, one topic) over gRPC, warm;
* Belfry right after a ``SetPreference`` by one of the users (the account's
  change counter moved, so the replica reloads the topic's inputs: the
  cache-miss path);
* the floor beside it: the same three reads done straight with asyncpg from
  the client (no gRPC, no precedence, no protobuf) — what any service built on
  this schema pays before doing anything.

Prints the median latency per round and over all rounds, and the CPU seconds
the service process and the client used.

Usage: python bench/preferences_effective.py [--calls 50] [--rounds 3] [--users 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from belfry import migrate, rpc
from belfry.api.common.v1 import common_pb2
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.api.preferences.v1 import preferences_pb2, preferences_pb2_grpc
from belfry.auth import TokenIssuer
from belfry.local import supervisor

ADMIN = os.environ.get("BELFRY_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
TOPIC = "contacts.contact_assigned"
ACCOUNT = "bench"
KEY = "bench=" + "b" * 48


async def _seed(channel: grpc.aio.Channel, users: list[str]) -> None:
    directory = directory_pb2_grpc.DirectoryServiceStub(channel)
    prefs = preferences_pb2_grpc.PreferencesServiceStub(channel)
    await directory.UpsertAccount(
        directory_pb2.UpsertAccountRequest(
            account=directory_pb2.Account(account_id=ACCOUNT, tier=directory_pb2.TIER_ENTERPRISE)
        )
    )
    sem = asyncio.Semaphore(20)

    async def one(i: int, u: str) -> None:
        async with sem:
            await directory.UpsertUser(
                directory_pb2.UpsertUserRequest(
                    user=directory_pb2.User(
                        account_id=ACCOUNT, user_id=u, email=f"{u}@example.test", display_name=f"User {i}",
                        time_zone="Europe/Paris", permission_set="sales" if i % 2 else "support",
                        super_admin=i == 0, active=True,
                    )
                )
            )  # fmt: skip

    await asyncio.gather(*(one(i, u) for i, u in enumerate(users)))
    issuer = TokenIssuer({"bench": KEY.split("=", 1)[1].encode()}, "bench")
    boss = (("authorization", f"Bearer {issuer.issue(ACCOUNT, users[0])}"),)
    off = preferences_pb2.Choice(topic=TOPIC, channel=common_pb2.CHANNEL_EMAIL, enabled=False)
    await prefs.SetAccountDefaults(preferences_pb2.SetAccountDefaultsRequest(choices=[off]), metadata=boss)
    on = preferences_pb2.Choice(topic=TOPIC, channel=common_pb2.CHANNEL_MOBILE, enabled=True)
    profile = preferences_pb2.RoleProfile(permission_set="sales", choices=[on])
    await prefs.CreateRoleProfile(preferences_pb2.CreateRoleProfileRequest(profile=profile), metadata=boss)
    for u in users[1::10]:
        meta = (("authorization", f"Bearer {issuer.issue(ACCOUNT, u)}"),)
        await prefs.SetPreference(
            preferences_pb2.SetPreferenceRequest(
                choice=preferences_pb2.Choice(topic=TOPIC, channel=common_pb2.CHANNEL_BELL, enabled=False)
            ),
            metadata=meta,
        )


async def _floor(conn: asyncpg.Connection, users: list[str]) -> None:
    await conn.fetch(
        "select * from preferences.users where account_id = $1 and user_id = any($2::text[])", ACCOUNT, users
    )
    await conn.fetch(
        "select * from preferences.user_settings where account_id = $1 and user_id = any($2::text[])", ACCOUNT, users
    )
    await conn.fetch(
        "select * from preferences.user_choices where account_id = $1 and topic = $2 and user_id = any($3::text[])",
        ACCOUNT, TOPIC, users,
    )  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--users", type=int, default=1000)
    args = parser.parse_args()
    print(
        f"python {sys.version.split()[0]}, grpcio {grpc.__version__}, asyncpg {asyncpg.__version__}, "
        f"cores {os.cpu_count()}, users per call {args.users}"
    )
    name = f"belfry_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN)
    await admin.execute(f'create database "{name}"')
    await admin.close()
    url = ADMIN.rsplit("/", 1)[0] + f"/{name}"
    await migrate.migrate_url(url)
    env = dict(os.environ)
    env.update(
        BELFRY_DATABASE_URL=url, BELFRY_TOKEN_KEYS=KEY, BELFRY_LOG_LEVEL="warning", BELFRY_METRICS_ADDRESS="off",
        BELFRY_PREFERENCES_GRPC_ADDRESS="127.0.0.1:0",
    )  # fmt: skip
    supervisor.local_callers(env)
    children = await supervisor.start_mesh(env, ("preferences",))
    conn = await asyncpg.connect(url)
    try:
        channel = supervisor.connect(env, env["BELFRY_PREFERENCES_ADDRESS"])
        # EffectiveBatch as the dispatcher asks it (the allow-list grants it to the dispatcher and batching).
        internal = rpc.connect(env["BELFRY_PREFERENCES_ADDRESS"], supervisor.client_tls(env, "dispatcher"))
        users = [f"u{i:04d}" for i in range(args.users)]
        await _seed(channel, users)
        stub = preferences_pb2_grpc.PreferencesServiceStub(internal)
        app = preferences_pb2_grpc.PreferencesServiceStub(channel)
        request = preferences_pb2.EffectiveBatchRequest(account_id=ACCOUNT, topic=TOPIC, user_ids=users)
        for _ in range(10):  # warm: connections, prepared statements, caches
            await stub.EffectiveBatch(request)
            await _floor(conn, users)
        proc = psutil.Process(children[0].process.pid)
        me = psutil.Process()
        cpu_service, cpu_client = sum(proc.cpu_times()[:2]), sum(me.cpu_times()[:2])
        issuer = TokenIssuer({"bench": KEY.split("=", 1)[1].encode()}, "bench")
        writer = (("authorization", f"Bearer {issuer.issue(ACCOUNT, users[3])}"),)
        belfry_all: list[float] = []
        floor_all: list[float] = []
        miss_all: list[float] = []
        for r in range(args.rounds):
            belfry: list[float] = []
            floor: list[float] = []
            miss: list[float] = []
            for i in range(args.calls):
                flip = preferences_pb2.Choice(topic=TOPIC, channel=common_pb2.CHANNEL_POPUP, enabled=bool(i % 2))
                await app.SetPreference(preferences_pb2.SetPreferenceRequest(choice=flip), metadata=writer)
                started = time.perf_counter()
                await stub.EffectiveBatch(request)
                miss.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                answer = await stub.EffectiveBatch(request)
                belfry.append((time.perf_counter() - started) * 1000)
                assert len(answer.recipients) == args.users
                started = time.perf_counter()
                await _floor(conn, users)
                floor.append((time.perf_counter() - started) * 1000)
            print(
                f"round {r + 1}: EffectiveBatch warm {statistics.median(belfry):.2f} ms, "
                f"after a write {statistics.median(miss):.2f} ms, raw asyncpg reads {statistics.median(floor):.2f} ms"
            )
            belfry_all += belfry
            floor_all += floor
            miss_all += miss
        calls = args.rounds * args.calls * 2
        cpu_service = sum(proc.cpu_times()[:2]) - cpu_service
        cpu_client = sum(me.cpu_times()[:2]) - cpu_client
        b, f = statistics.median(belfry_all), statistics.median(floor_all)
        p90 = statistics.quantiles(belfry_all, n=10)[-1]
        print(f"median EffectiveBatch warm ({args.users} users): {b:.2f} ms (p90 {p90:.2f} ms)")
        print(f"median EffectiveBatch right after a write (cache reload): {statistics.median(miss_all):.2f} ms")
        print(f"median raw asyncpg reads: {f:.2f} ms; warm EffectiveBatch / raw reads = {b / f:.2f}")
        print(
            f"cpu seconds: preferences service {cpu_service:.2f} ({calls} EffectiveBatch + {calls // 2} SetPreference), "
            f"client (bench + floor) {cpu_client:.2f}"
        )
        await channel.close()
        await internal.close()
    finally:
        await conn.close()
        await supervisor.stop_all(children, 5)
        admin = await asyncpg.connect(ADMIN)
        await admin.execute(f'drop database if exists "{name}" with (force)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
