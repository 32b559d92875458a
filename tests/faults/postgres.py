"""A private PostgreSQL cluster that a test may stop, crash and restart at will.

Debian's own server binaries (``/usr/lib/postgresql/15/bin``, or
``BELFRY_TEST_PG_BIN``) run a cluster in a temporary directory on a free
loopback port, never the machine's shared server: restarting that one would
break every other test. PostgreSQL refuses to run as root, so when the tests
run as root the directory is handed to the ``postgres`` system user and every
``initdb``/``pg_ctl`` call runs through ``runuser``. ``fsync`` is off (the
cluster is thrown away; an immediate restart is not an operating-system
crash, so committed data still survives it).
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

PG_BIN = Path(os.environ.get("BELFRY_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
RUN_AS = "postgres"  # the system user Debian's server package creates

# Small and quick: the cluster holds a few test databases for a few minutes.
_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "full_page_writes": "off",
    "shared_buffers": "'32MB'",
    "max_connections": "200",
    "log_min_messages": "warning",
    "logging_collector": "off",
}


class PostgresError(RuntimeError):
    """An ``initdb`` or ``pg_ctl`` call failed; the message carries its output and the server log's tail."""


def available() -> str | None:
    """Why a private cluster cannot be started here (None when it can)."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not (PG_BIN / tool).is_file():
            return f"{PG_BIN / tool} is missing (Debian's postgresql-15 package provides it)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            return f"running as root and there is no {RUN_AS!r} user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing"
    return None


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PrivatePostgres:
    """One throwaway cluster: ``await PrivatePostgres.create()``, then ``stop``/``start``/``restart``/``destroy``."""

    root: Path
    port: int
    _running: bool = field(default=False, repr=False)

    @property
    def data(self) -> Path:
        """The data directory."""
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        """Where the server writes its log."""
        return self.root / "server.log"

    @property
    def admin_dsn(self) -> str:
        """The maintenance database, as the superuser (trust authentication on loopback)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def running(self) -> bool:
        """Whether the last ``start``/``restart`` succeeded and no ``stop`` came after."""
        return self._running

    @classmethod
    async def create(cls, *, port: int | None = None) -> PrivatePostgres:
        """``initdb`` a fresh cluster in a new temporary directory and start it."""
        reason = available()
        if reason is not None:
            raise PostgresError(reason)
        # Directly under the temporary folder: pytest's own tmp_path is private
        # to root (0700), which the unprivileged server could not traverse.
        root = Path(tempfile.mkdtemp(prefix="belfry-faults-pg-"))
        if os.geteuid() == 0:
            user = pwd.getpwnam(RUN_AS)
            os.chown(root, user.pw_uid, user.pw_gid)
        pg = cls(root, port or free_port())
        try:
            await pg._run(
                "initdb", "-D", str(pg.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"
            )
            conf = "".join(f"{key} = {value}\n" for key, value in _SETTINGS.items())
            conf += f"port = {pg.port}\nunix_socket_directories = '{root}'\n"
            with (pg.data / "postgresql.conf").open("a") as out:  # root may append; the owner stays postgres
                out.write(conf)
            await pg.start()
        except BaseException:
            await pg.destroy()
            raise
        return pg

    async def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        await self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60")
        self._running = True
        await self.wait_ready()

    async def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate — immediate is a crash)."""
        self._running = False
        await self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "60")

    async def restart(self, mode: str = "immediate") -> None:
        """``pg_ctl restart -m <mode>``: every connection is cut; with ``immediate``, crash recovery on start."""
        self._running = False
        await self._run(
            "pg_ctl", "restart", "-D", str(self.data), "-m", mode, "-l", str(self.logfile), "-w", "-t", "60"
        )
        self._running = True
        await self.wait_ready()

    async def wait_ready(self, attempts: int = 300) -> None:
        """Until a query answers (``pg_ctl -w`` may return while recovery still refuses logins)."""
        last: BaseException | None = None
        for _ in range(attempts):
            try:
                conn = await asyncpg.connect(self.admin_dsn, timeout=5)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                last = exc
                await asyncio.sleep(0.05)
                continue
            try:
                await conn.fetchval("select 1")
            finally:
                await conn.close()
            return
        raise PostgresError(f"the private server never answered: {last!r}\n{self.log_tail()}")

    async def destroy(self) -> None:
        """Stop the server at once (if running) and remove its directory."""
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(PostgresError):  # already gone: the directory goes anyway
                await self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30")
        self._running = False
        await asyncio.to_thread(shutil.rmtree, self.root, True)

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log, for failure messages."""
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    async def _run(self, program: str, *args: str) -> str:
        command = [str(PG_BIN / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", RUN_AS, "--", *command]
        # Asynchronously: the test's event loop keeps serving proxies and sinks while pg_ctl waits.
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=self.root,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await process.communicate()
        text = out.decode(errors="replace")
        if process.returncode != 0:
            raise PostgresError(f"{' '.join(command)} exited with {process.returncode}:\n{text}\n{self.log_tail()}")
        return text
