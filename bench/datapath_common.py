"""Shared pieces of the data-path benchmarks (issue 16, section 3).

Real service processes (the ``belfry up`` supervisor) on a scratch database
of the local PostgreSQL, one seeded account, the events they are sent, and
the counters that say what the data path cost:

* WAL bytes (``pg_current_wal_lsn()`` difference) and ``pg_stat_wal``;
* row operations per table (``pg_stat_user_tables``), read only once every
  backend that wrote them has exited (a backend flushes its statistics at
  exit; a live one may hold them back for up to ten seconds);
* relation sizes (``pg_total_relation_size``);
* CPU seconds per process (utime + stime from /proc): named processes, this
  database's PostgreSQL backends, and every PostgreSQL process of the server.

WAL, ``pg_stat_wal`` and the all-processes CPU are server-wide: work on other
databases of the same server lands in them too, so every snapshot also
records the commits and row writes of the other databases (``foreign``),
which a reader can use to judge a figure.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import asyncpg
import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from belfry.api.common.v1 import common_pb2
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb
from belfry.api.dispatcher.v1 import dispatcher_pb2_grpc
from belfry.api.preferences.v1 import preferences_pb2, preferences_pb2_grpc
from belfry.auth import TokenIssuer
from belfry.local import supervisor

ACCOUNT = "bench"
# deals.stage_changed: on for email and bell by default (bell, browser, email with the browser default on).
TOPIC = "deals.stage_changed"
KEY_ID = "bench"
KEY = "b" * 48
UNSUBSCRIBE_KEY = "bench-unsubscribe-key-0123456789abcdef"
DATA_SCHEMAS = ("dispatcher", "queue", "gateway", "email", "webpush", "mobile")
# The services these benchmarks start (each on a port the OS picks).
MESH = ("preferences", "dispatcher", "webpush", "email", "gateway")


def user_ids(n: int) -> list[str]:
    """The seeded users' ids."""
    return [f"u{i}" for i in range(n)]


def mesh_env(dsn: str, home: Path, *, smtp_port: int | None = None) -> dict[str, str]:
    """The environment of every child: this database, ports chosen by the OS, quiet logs, shipped defaults otherwise."""
    env = dict(os.environ)
    env.update(
        BELFRY_DATABASE_URL=dsn,
        BELFRY_TOKEN_KEYS=f"{KEY_ID}={KEY}",
        BELFRY_TOKEN_ACTIVE_KID=KEY_ID,
        BELFRY_LOG_LEVEL="warning",
        BELFRY_METRICS_ADDRESS="off",
        BELFRY_GATEWAY_HTTP_HOST="127.0.0.1",
        BELFRY_GATEWAY_HTTP_PORT="0",
        BELFRY_PUBLIC_URL="http://127.0.0.1:8080",
        BELFRY_UNSUBSCRIBE_KEY=UNSUBSCRIBE_KEY,
        BELFRY_EMAIL_FROM="Belfry <notifications@example.test>",
        BELFRY_EMAIL_DAILY_CAP="1000000",  # the cap is checked and counted, never reached
        BELFRY_VAPID_PRIVATE_KEY_FILE=str(home / "vapid_private.pem"),
    )
    if smtp_port is not None:
        env.update(BELFRY_SMTP_HOST="127.0.0.1", BELFRY_SMTP_PORT=str(smtp_port), BELFRY_SMTP_STARTTLS="false")
    for name in MESH:
        env[f"BELFRY_{name.upper()}_GRPC_ADDRESS"] = "127.0.0.1:0"
    return local_callers(env)


# The before/after runs start an older tree's services with these same scripts (issue 16, section 3: "same
# script"); trees from before caller identities have neither helper and need neither.
def local_callers(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the local mesh's identities (``supervisor.local_callers``) where the tree has them."""
    add = getattr(supervisor, "local_callers", None)
    return add(env) if add is not None else env


def connect(env: dict[str, str], address: str) -> grpc.aio.Channel:
    """A channel calling as the local caller (``supervisor.connect``); a plain one on an older tree."""
    dial = getattr(supervisor, "connect", None)
    return dial(env, address) if dial is not None else grpc.aio.insecure_channel(address)


async def seed(env: dict[str, str], users: list[str], *, browser: bool = False) -> None:
    """One enterprise account, its users and an actor; ``browser``: every user turns TOPIC on for the browser too."""
    async with connect(env, env["BELFRY_PREFERENCES_ADDRESS"]) as channel:
        directory = directory_pb2_grpc.DirectoryServiceStub(channel)
        await directory.UpsertAccount(
            directory_pb2.UpsertAccountRequest(
                account=directory_pb2.Account(account_id=ACCOUNT, name="Bench", tier=directory_pb2.TIER_ENTERPRISE)
            )
        )
        limit = asyncio.Semaphore(16)

        async def one(user: str) -> None:
            async with limit:
                await directory.UpsertUser(
                    directory_pb2.UpsertUserRequest(
                        user=directory_pb2.User(
                            account_id=ACCOUNT, user_id=user, email=f"{user}@example.test",
                            display_name=user.title(), locale="en", time_zone="UTC",
                            permission_set="sales", active=True,
                        )
                    )
                )  # fmt: skip

        await asyncio.gather(*(one(u) for u in [*users, "actor"]))
        if browser:
            # Each user's own choice (an account default would send everyone a notice of the change).
            issuer = TokenIssuer({KEY_ID: KEY.encode()}, KEY_ID)
            prefs = preferences_pb2_grpc.PreferencesServiceStub(channel)
            choice = preferences_pb2.Choice(topic=TOPIC, channel=common_pb2.CHANNEL_BROWSER, enabled=True)

            async def browser_on(user: str) -> None:
                async with limit:
                    await prefs.SetPreference(
                        preferences_pb2.SetPreferenceRequest(choice=choice),
                        metadata=(("authorization", f"Bearer {issuer.issue(ACCOUNT, user)}"),),
                    )

            await asyncio.gather(*(browser_on(u) for u in users))


def event(i: int, recipients: list[str]) -> pb.Event:
    """Event ``i`` of TOPIC for ``recipients``, with a fresh idempotency key."""
    ev = pb.Event(
        account_id=ACCOUNT,
        topic=TOPIC,
        actor=pb.Actor(user_id="actor", source=pb.ACTOR_SOURCE_UI),
        object=pb.ObjectRef(type="deal", id=f"D-{i}", display_name=f"Deal {i}", url=f"https://app.example/deals/{i}"),
        recipient_user_ids=recipients,
        idempotency_key=uuid.uuid4().hex,
    )
    ev.occurred_at.GetCurrentTime()
    return ev


async def publish_all(
    stub: dispatcher_pb2_grpc.DispatcherServiceStub, events: list[pb.Event], *, per_call: int = 1000, inflight: int = 4
) -> float:
    """PublishBatch every event (calls of ``per_call``, ``inflight`` at once), each accepted; return seconds."""
    calls = [events[i : i + per_call] for i in range(0, len(events), per_call)]
    it = iter(calls)

    async def worker() -> None:
        for batch in it:
            answer = await stub.PublishBatch(pb.PublishBatchRequest(events=batch), timeout=120)
            bad = [s for s in answer.statuses if s.outcome != pb.OUTCOME_ACCEPTED]
            if bad:
                raise RuntimeError(f"{len(bad)} events not accepted, first: {bad[0]}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return time.perf_counter() - started


# -- CPU ---------------------------------------------------------------------


def _cpu(p: psutil.Process) -> float:
    try:
        t = p.cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


def _server_cpu(postmaster: psutil.Process) -> tuple[dict[int, float], float]:
    """CPU of the server's live processes, and of the postmaster itself plus every child it has reaped."""
    children = {c.pid: _cpu(c) for c in postmaster.children()}
    t = postmaster.cpu_times()
    return children, float(t.user + t.system + t.children_user + t.children_system)


@dataclass
class Cpu:
    """CPU seconds between ``start`` and ``stop``: named processes, this database's backends, the whole server.

    ``postgres`` counts the backends connected to ``database`` (those that
    exit before ``stop`` are missed: read before stopping services);
    ``postgres_all`` every process of the PostgreSQL server we are connected
    to (the postmaster and its children: backends of every database, WAL
    writer, checkpointer, autovacuum), children that exited meanwhile
    included through the postmaster's reaped-children times.
    """

    procs: dict[str, psutil.Process]
    database: str
    _before: dict[str, float] = field(default_factory=dict)
    _backends: dict[int, float] = field(default_factory=dict)
    _children: dict[int, float] = field(default_factory=dict)
    _reaped: float = 0.0
    _postmaster: psutil.Process | None = None

    async def _backend_pids(self, conn: asyncpg.Connection) -> list[int]:
        rows = await conn.fetch("select pid from pg_stat_activity where datname = $1", self.database)
        return [r["pid"] for r in rows]

    async def start(self, conn: asyncpg.Connection) -> None:
        """Take the starting readings."""
        if self._postmaster is None:
            self._postmaster = psutil.Process(await conn.fetchval("select pg_backend_pid()")).parent()
        assert self._postmaster is not None
        self._children, self._reaped = _server_cpu(self._postmaster)
        self._backends = {pid: self._children.get(pid, 0.0) for pid in await self._backend_pids(conn)}
        self._before = {k: _cpu(p) for k, p in self.procs.items()}

    async def stop(self, conn: asyncpg.Connection) -> dict[str, float]:
        """CPU seconds since ``start``, per name, plus ``postgres`` and ``postgres_all``."""
        assert self._postmaster is not None
        used = {k: _cpu(p) - self._before[k] for k, p in self.procs.items()}
        children, reaped = _server_cpu(self._postmaster)
        backends = set(self._backends) | set(await self._backend_pids(conn))
        used["postgres"] = sum(
            children.get(pid, 0.0) - self._backends.get(pid, 0.0) for pid in backends if pid in children
        )
        live = sum(v - self._children.get(pid, 0.0) for pid, v in children.items())
        # A child that exited meanwhile is in ``reaped`` with its whole life: take off what it had used before.
        gone = sum(v for pid, v in self._children.items() if pid not in children)
        used["postgres_all"] = live + (reaped - self._reaped) - gone
        return used


def cpu_line(used: dict[str, float], seconds: float, per: int, unit: str) -> str:
    """'name 1.2 s (34 % of 2 cores, 56 µs/unit)' for every process."""
    cores = os.cpu_count() or 1
    return ", ".join(
        f"{k} {v:.2f} s ({100 * v / seconds / cores:.0f} % of {cores} cores, {1e6 * v / per:.0f} µs/{unit})"
        for k, v in used.items()
    )


# -- PostgreSQL counters -------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """One table's cumulative counters and its size."""

    ins: int
    upd: int
    hot: int
    dele: int
    live: int
    dead: int
    size: int
    indexes: int
    partial: int


@dataclass(frozen=True)
class Snapshot:
    """The server's WAL position and counters, this database's tables, other databases' activity."""

    lsn: int
    wal_records: int
    wal_fpi: int
    wal_bytes: int
    tables: dict[str, Table]
    foreign_commits: int
    foreign_rows: int


async def snapshot(conn: asyncpg.Connection) -> Snapshot:
    """Read everything (``conn`` is connected to the benchmark's database)."""
    await conn.execute("select pg_stat_clear_snapshot()")
    lsn = await conn.fetchval("select (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
    wal = await conn.fetchrow("select wal_records, wal_fpi, wal_bytes::bigint as wal_bytes from pg_stat_wal")
    rows = await conn.fetch(
        """
        select s.schemaname || '.' || s.relname as name, s.n_tup_ins, s.n_tup_upd, s.n_tup_hot_upd, s.n_tup_del,
               s.n_live_tup, s.n_dead_tup, pg_total_relation_size(s.relid) as size,
               (select count(*) from pg_index i where i.indrelid = s.relid) as indexes,
               (select count(*) from pg_index i where i.indrelid = s.relid and i.indpred is not null) as partial
        from pg_stat_user_tables s where s.schemaname = any($1::text[])
        """,
        list(DATA_SCHEMAS),
    )
    foreign = await conn.fetchrow(
        """
        select coalesce(sum(xact_commit), 0)::bigint as commits,
               coalesce(sum(tup_inserted + tup_updated + tup_deleted), 0)::bigint as rows
        from pg_stat_database where datname is not null and datname <> current_database()
        """
    )
    assert wal is not None and foreign is not None
    tables = {
        r["name"]: Table(
            r["n_tup_ins"], r["n_tup_upd"], r["n_tup_hot_upd"], r["n_tup_del"], r["n_live_tup"],
            r["n_dead_tup"], r["size"], r["indexes"], r["partial"],
        )
        for r in rows
    }  # fmt: skip
    return Snapshot(
        lsn, wal["wal_records"], wal["wal_fpi"], wal["wal_bytes"], tables, foreign["commits"], foreign["rows"]
    )


# WAL between two positions by what it wrote (pg_walinspect): each record counts for the relation of
# its first block reference (a record naming several blocks — an update moving a row to another page, an
# index page split — counts once, for the first), records naming no relation by resource manager.
_WAL_BY_RELATION = r"""
with recs as (
    select resource_manager as rm, record_length as len, fpi_length as fpi,
           regexp_match(block_ref, 'rel \d+/(\d+)/(\d+)') as ref
    from pg_get_wal_records_info('0/0'::pg_lsn + $1::numeric, least('0/0'::pg_lsn + $2::numeric,
                                                                    pg_current_wal_flush_lsn()))
)
select case when ref is null then '(' || rm || ')'
            when ref[1]::oid <> (select oid from pg_database where datname = current_database())
                then '(other databases)'
            else coalesce((select c.oid::regclass::text from pg_class c where c.relfilenode = ref[2]::oid limit 1),
                          '(relation ' || ref[2] || ')') end as what,
       sum(len)::bigint as bytes, sum(fpi)::bigint as fpi, count(*) as records
from recs group by 1 order by 2 desc
"""


async def wal_by_relation(
    conn: asyncpg.Connection | asyncpg.Pool, start: int, end: int
) -> list[tuple[str, int, int, int]]:
    """(what, WAL bytes, of which full-page images, records) between two ``Snapshot.lsn``, largest first."""
    await conn.execute("create extension if not exists pg_walinspect")
    rows = await conn.fetch(_WAL_BY_RELATION, start, end)
    return [(r["what"], r["bytes"], r["fpi"], r["records"]) for r in rows]


async def settle_stats(conn: asyncpg.Connection, patience: float = 60.0) -> None:
    """Wait until no other backend is connected to this database, so every counter has been flushed."""
    deadline = time.monotonic() + patience
    while await conn.fetchval(
        "select count(*) from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid()"
    ):
        if time.monotonic() > deadline:
            raise RuntimeError("backends still connected to the benchmark database")
        await asyncio.sleep(0.1)
    await conn.execute("select pg_stat_force_next_flush()")


@dataclass(frozen=True)
class Delta:
    """What happened between two snapshots."""

    wal: int
    wal_records: int
    wal_fpi: int
    tables: dict[str, Table]  # counters as differences; size, live and dead as at the end
    foreign_commits: int
    foreign_rows: int


def delta(a: Snapshot, b: Snapshot) -> Delta:
    """``b`` minus ``a`` (tables that did not exist in ``a`` count from zero)."""
    zero = Table(0, 0, 0, 0, 0, 0, 0, 0, 0)
    tables = {}
    for name, t in b.tables.items():
        s = a.tables.get(name, zero)
        tables[name] = Table(
            t.ins - s.ins, t.upd - s.upd, t.hot - s.hot, t.dele - s.dele, t.live, t.dead, t.size, t.indexes, t.partial
        )
    return Delta(
        b.lsn - a.lsn,
        b.wal_records - a.wal_records,
        b.wal_fpi - a.wal_fpi,
        tables,
        b.foreign_commits - a.foreign_commits,
        b.foreign_rows - a.foreign_rows,
    )


# Whether any delivery is still waiting or leased, through the two partial indexes (a count would read the table).
PENDING = """
select exists (select 1 from queue.deliveries where finished_at is null and state in ('queued', 'leased'))
"""


async def fanned_out(conn: asyncpg.Connection) -> bool:
    """True once no accepted event waits for fan-out (always on a tree that fans out inside the call)."""
    if not await conn.fetchval("select to_regclass('dispatcher.fanout') is not null"):
        return True
    return not await conn.fetchval("select exists (select 1 from dispatcher.fanout)")


async def wait_fanned_out(conn: asyncpg.Connection, limit: float = 600.0) -> float:
    """Wait until every accepted event is fanned out; the seconds it took."""
    started = time.monotonic()
    while not await fanned_out(conn):
        if time.monotonic() - started > limit:
            raise RuntimeError(f"fan-out not done {limit:.0f} s after the last event was accepted")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


def index_entries(t: Table) -> int:
    """Upper bound of index entries written: every index times (inserts + non-HOT updates).

    A partial index only receives the row versions its predicate accepts, so
    for tables with partial indexes the true count is lower (see ``partial``).
    """
    return t.indexes * (t.ins + t.upd - t.hot)


# -- sinks and versions ----------------------------------------------------------


def start_smtp_sink(port: int) -> subprocess.Popen[bytes]:
    """Postfix's ``smtp-sink`` on 127.0.0.1:port (a C sink; advertises PIPELINING), 1,000 connections backlog."""
    sink_bin = shutil.which("smtp-sink")
    if sink_bin is None:
        raise SystemExit("smtp-sink not found: apt-get install -y postfix")
    return subprocess.Popen(  # noqa: S603 - fixed tool, fixed arguments
        [sink_bin, "-u", "nobody", f"127.0.0.1:{port}", "1000"], stdout=subprocess.DEVNULL
    )


def git_commit() -> str:
    """The commit the benchmarked tree came from (BELFRY_BENCH_COMMIT, else ``git rev-parse``), '+dirty' when edited."""
    given = os.environ.get("BELFRY_BENCH_COMMIT")
    if given:
        return given
    root = Path(__file__).resolve().parent.parent
    git = shutil.which("git")
    if git is None:
        return "unknown"
    try:
        head = subprocess.run(  # noqa: S603 - fixed tool
            [git, "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(  # noqa: S603 - fixed tool
            [git, "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


async def versions(conn: asyncpg.Connection, *packages: str) -> str:
    """Python, PostgreSQL with its durability settings, the packages, the cores and the load."""
    server = await conn.fetchval("show server_version")
    sync = await conn.fetchval("show synchronous_commit")
    fsync = await conn.fetchval("show fsync")
    names = ", ".join(f"{p} {metadata.version(p)}" for p in packages)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"commit {git_commit()}; Python {platform.python_version()}, PostgreSQL {server} "
        f"(synchronous_commit={sync}, fsync={fsync}), {names}; {os.cpu_count()} cores, load {load}"
    )
