"""A private, durable PostgreSQL cluster for a benchmark, and what a phase cost it.

The machine's shared server also serves other people's test runs, so its WAL
position and its processes' CPU mix their work with ours. A benchmark that
reports WAL bytes and PostgreSQL CPU per delivery starts a cluster of its
own instead: Debian's server binaries, ``initdb`` defaults (``fsync``,
``full_page_writes`` and ``synchronous_commit`` on, 128 MB of shared
buffers), a temporary directory on the same disk as the shared server, a
free loopback port. Everything that cluster does in a phase is the phase's.

``PgMeter`` measures one phase: the CPU seconds of this process and of every
process of the cluster (backends apart from the background processes: WAL
writer, checkpointer, autovacuum launcher; children that exited during the
phase are counted through the postmaster's reaped-children times), the WAL
written (``pg_current_wal_lsn()`` difference) and the row counters of
``pg_stat_user_tables``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import psutil

PG_BIN = Path(os.environ.get("BELFRY_BENCH_PG_BIN", "/usr/lib/postgresql/15/bin"))
RUN_AS = "postgres"  # PostgreSQL refuses to run as root


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class DurableCluster:
    """``async with DurableCluster() as cluster:`` a fresh cluster, removed afterwards."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="belfry-bench-pg-")))
    port: int = field(default_factory=_free_port)
    statements: bool = False  # load pg_stat_statements (bench.on_private_pg --statements reports from it)

    @property
    def admin_dsn(self) -> str:
        """The maintenance database as the superuser (trust on loopback)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def data(self) -> Path:
        """The data directory."""
        return self.root / "data"

    def postmaster(self) -> psutil.Process:
        """The cluster's postmaster process."""
        return psutil.Process(int((self.data / "postmaster.pid").read_text().split()[0]))

    async def __aenter__(self) -> DurableCluster:
        if os.geteuid() == 0:
            user = pwd.getpwnam(RUN_AS)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        await self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.root}'\n"
                "max_connections = 100\nlogging_collector = off\n"
            )
            if self.statements:
                conf.write("shared_preload_libraries = 'pg_stat_statements'\npg_stat_statements.max = 1000\n")
        await self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w")
        return self

    async def __aexit__(self, *_: object) -> None:
        with contextlib.suppress(RuntimeError):
            await self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w")
        await asyncio.to_thread(shutil.rmtree, self.root, True)

    async def _run(self, program: str, *args: str) -> None:
        command = [str(PG_BIN / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", RUN_AS, "--", *command]
        # Output to a file, not a pipe: the server pg_ctl starts could inherit the pipe (under uvloop it
        # does), and waiting for the pipe's end would then wait for the server to stop.
        log = self.root / "tools.log"
        with log.open("ab") as out:
            process = await asyncio.create_subprocess_exec(
                *command, cwd=self.root, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out
            )
            await process.wait()
        if process.returncode != 0:
            text = log.read_text(errors="replace")
            raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}:\n{text}")


_BACKGROUND = ("checkpointer", "background writer", "walwriter", "autovacuum launcher", "logical replication")


def _cpu(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
        return float(times.user + times.system)
    except psutil.Error:
        return 0.0


def _is_background(process: psutil.Process) -> bool:
    try:
        title = " ".join(process.cmdline())
    except psutil.Error:
        return False
    return any(name in title for name in _BACKGROUND)


@dataclass
class Cost:
    """What one phase cost: wall time, CPU seconds, WAL bytes and row counters."""

    seconds: float = 0.0
    client: float = 0.0  # this process (and its children)
    backends: float = 0.0  # PostgreSQL backends and autovacuum workers
    background: float = 0.0  # WAL writer, checkpointer, background writer, launcher
    wal: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # n_tup_ins/upd/hot_upd/del summed over all tables
    dead: int = 0  # n_dead_tup of the phase's main table at the end

    def per(self, items: int) -> dict[str, float]:
        """Per item: CPU µs of each process kind, WAL bytes, row versions, HOT share."""
        upd = self.rows.get("upd", 0)
        return {
            "client_us": self.client / items * 1e6,
            "pg_us": (self.backends + self.background) / items * 1e6,
            "backend_us": self.backends / items * 1e6,
            "background_us": self.background / items * 1e6,
            "wal": self.wal / items,
            "ins": self.rows.get("ins", 0) / items,
            "upd": upd / items,
            "hot": self.rows.get("hot", 0) / items,
            "del": self.rows.get("del", 0) / items,
            "versions": (self.rows.get("ins", 0) + upd) / items,
            "hot_share": self.rows.get("hot", 0) / upd if upd else 0.0,
            "dead": self.dead / items,
        }


class PgMeter:
    """Measure a phase on a private cluster: ``async with PgMeter(cluster, dsn, table) as cost: ...``.

    Close the phase's connections after the block, not inside it: a backend
    that is exiting as the block ends is neither a live process nor yet
    reaped, and its CPU would be missed. Row counters are read after every
    connection of the phase has closed (backends flush their statistics when
    they exit), so call ``settle`` once the phase's pools are closed.
    """

    def __init__(self, cluster: DurableCluster, dsn: str, table: str, client: psutil.Process | None = None) -> None:
        self.cluster = cluster
        self.dsn = dsn
        self.table = table
        self.me = client or psutil.Process()
        self.cost = Cost()

    def _cpu_now(self) -> tuple[float, float, float]:
        own = sum(self.me.cpu_times()[:4])  # user, system, children user, children system
        master = self.cluster.postmaster()
        reaped = master.cpu_times()
        backends = reaped.children_user + reaped.children_system
        background = reaped.user + reaped.system
        for child in master.children():
            if _is_background(child):
                background += _cpu(child)
            else:
                backends += _cpu(child)
        return own, backends, background

    async def _snapshot(self) -> tuple[int, dict[str, int], int]:
        conn = await asyncpg.connect(self.dsn)
        try:
            lsn = await conn.fetchval("select pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
            row = await conn.fetchrow(
                """
                select coalesce(sum(n_tup_ins), 0)::bigint as ins, coalesce(sum(n_tup_upd), 0)::bigint as upd,
                       coalesce(sum(n_tup_hot_upd), 0)::bigint as hot, coalesce(sum(n_tup_del), 0)::bigint as del,
                       coalesce(sum(n_dead_tup) filter (where schemaname || '.' || relname = $1), 0)::bigint as dead
                from pg_stat_user_tables
                """,
                self.table,
            )
        finally:
            await conn.close()
        assert row is not None
        return int(lsn), {k: int(row[k]) for k in ("ins", "upd", "hot", "del")}, int(row["dead"])

    async def _quiet(self) -> None:
        """Until no client backend of the database is left (their statistics are then flushed)."""
        name = self.dsn.rsplit("/", 1)[1]
        conn = await asyncpg.connect(self.dsn)
        try:
            for _ in range(400):
                others = await conn.fetchval(
                    "select count(*) from pg_stat_activity where datname = $1 and pid <> pg_backend_pid()"
                    " and backend_type = 'client backend'",
                    name,
                )
                if others == 0:
                    break
                await asyncio.sleep(0.025)
        finally:
            await conn.close()

    async def __aenter__(self) -> Cost:
        # Let the postmaster reap the backends of the previous phase (``settle`` waited until they
        # left), or their CPU would count as this phase's.
        await asyncio.sleep(0.3)
        self._lsn0, self._rows0, _ = await self._snapshot()
        self._cpu0 = self._cpu_now()
        self._t0 = asyncio.get_running_loop().time()
        return self.cost

    async def __aexit__(self, *_: object) -> None:
        # CPU, time and WAL stop here (an autovacuum after the phase is not the phase's);
        # the row counters are read by ``settle`` once the phase's connections are gone.
        own, backends, background = self._cpu_now()
        self.cost.seconds = asyncio.get_running_loop().time() - self._t0
        self.cost.client = own - self._cpu0[0]
        self.cost.backends = backends - self._cpu0[1]
        self.cost.background = background - self._cpu0[2]
        self._lsn1 = (await self._snapshot())[0]

    async def settle(self) -> Cost:
        """Read WAL and row counters once the phase's connections are gone; return the cost."""
        await self._quiet()
        previous: dict[str, int] | None = None
        for _attempt in range(100):
            _lsn, rows, dead = await self._snapshot()
            if rows == previous:
                break
            previous = rows
            await asyncio.sleep(0.1)
        self.cost.wal = self._lsn1 - self._lsn0
        self.cost.rows = {k: rows[k] - self._rows0[k] for k in rows}
        self.cost.dead = dead
        return self.cost
