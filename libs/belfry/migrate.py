"""Forward-only migrations over plain SQL files.

Each owner (the queue module in ``libs/`` and each declared service) keeps
its files in a ``migrations/`` folder of its package, named
``NNNN_description.sql``, read with importlib.resources so an installed
wheel carries them like the source tree does. The runner takes
a PostgreSQL advisory lock so that several replicas (or a Kubernetes Job
racing a test) never apply the same file twice, records a SHA-256 checksum of
every applied file, and refuses to start when an applied file was edited:
a released migration is history and gets a new file instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable

import asyncpg

from belfry import log, service
from belfry.errors import FailedPrecondition

_LOG = log.get(__name__)
_LOCK_KEY = 0x62656C66  # "belf": one lock for every migration run


def owners() -> list[tuple[str, Traversable]]:
    """Whose migrations, in dependency order: the queue's first, then each declared service's.

    A later owner may reference an earlier one's tables (the dispatcher writes
    the queue's rows in its own transaction).
    """
    found = [("queue", files("belfry.queue") / "migrations")]
    return found + [(d.name, files(d.package) / "migrations") for d in service.declared()]


@dataclass(frozen=True)
class Migration:
    """One SQL file of one owner."""

    owner: str
    version: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover() -> list[Migration]:
    """Every migration file, owners in order, files by name."""
    found: list[Migration] = []
    for owner, folder in owners():
        if not folder.is_dir():
            continue
        for path in sorted((p for p in folder.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name):
            found.append(Migration(owner, path.name.removesuffix(".sql"), path.read_text(encoding="utf-8")))
    return found


async def migrate(conn: asyncpg.Connection, migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply what is missing, each file in its own transaction; return what was applied."""
    pending = discover() if migrations is None else migrations
    await conn.execute("select pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            """
            create table if not exists public.belfry_schema_migrations (
                owner text not null,
                version text not null,
                checksum text not null,
                applied_at timestamptz not null default now(),
                primary key (owner, version)
            )
            """
        )
        rows = await conn.fetch("select owner, version, checksum from public.belfry_schema_migrations")
        applied = {(r["owner"], r["version"]): r["checksum"] for r in rows}
        done: list[Migration] = []
        for m in pending:
            known = applied.get((m.owner, m.version))
            if known is not None:
                if known != m.checksum:
                    raise FailedPrecondition(
                        f"migration {m.owner}/{m.version} was edited after it was applied; "
                        "add a new migration file instead of changing an applied one"
                    )
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "insert into public.belfry_schema_migrations (owner, version, checksum) values ($1, $2, $3)",
                    m.owner,
                    m.version,
                    m.checksum,
                )
            _LOG.info("migration applied", owner=m.owner, version=m.version)
            done.append(m)
        return done
    finally:
        await conn.execute("select pg_advisory_unlock($1)", _LOCK_KEY)


async def migrate_url(dsn: str) -> list[Migration]:
    """Connect, migrate, disconnect: the deployment Job's whole work."""
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn)
    finally:
        await conn.close()
