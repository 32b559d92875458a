"""Shared pieces of the queue benchmarks: a scratch database, CPU accounting, versions."""

from __future__ import annotations

import os
import platform
import sys
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import asyncpg
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from belfry import migrate

ADMIN = os.environ.get("BELFRY_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


async def scratch_database(*, migrated: bool = True) -> str:
    """Create a fresh database, migrated unless told not to; return its DSN (drop it with ``drop_database``)."""
    name = f"belfry_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(ADMIN)
    try:
        await admin.execute(f'create database "{name}"')
    finally:
        await admin.close()
    dsn = ADMIN.rsplit("/", 1)[0] + f"/{name}"
    if migrated:
        await migrate.migrate_url(dsn)
    return dsn


async def drop_database(dsn: str) -> None:
    """Remove a scratch database."""
    name = dsn.rsplit("/", 1)[1]
    admin = await asyncpg.connect(ADMIN)
    try:
        await admin.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await admin.close()


def _postgres_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("postgres")]


@dataclass
class CpuMeter:
    """CPU seconds of this process and of every PostgreSQL process over an interval."""

    own: float = 0.0
    postgres: float = 0.0

    def __enter__(self) -> CpuMeter:
        self._me = psutil.Process()
        self._pg = _postgres_processes()
        self._own0 = sum(self._me.cpu_times()[:2])
        self._pg0 = {p.pid: self._cpu(p) for p in self._pg}
        return self

    @staticmethod
    def _cpu(p: psutil.Process) -> float:
        try:
            t = p.cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return 0.0

    def __exit__(self, *_: object) -> None:
        self.own = sum(self._me.cpu_times()[:2]) - self._own0
        # New backends appear during the run; count them from zero.
        now = {p.pid: self._cpu(p) for p in _postgres_processes()}
        self.postgres = sum(v - self._pg0.get(pid, 0.0) for pid, v in now.items())

    def share(self, seconds: float) -> str:
        """CPU as a share of the machine's cores over ``seconds`` of wall time."""
        cores = psutil.cpu_count() or 1
        return (
            f"client {self.own / seconds / cores:.0%}, postgres {self.postgres / seconds / cores:.0%} of {cores} cores"
        )


async def server_versions(*packages: str) -> str:
    """``versions`` of the server ``ADMIN`` names, read from a scratch database made and dropped for it."""
    probe = await scratch_database(migrated=False)
    try:
        return await versions(probe, *packages)
    finally:
        await drop_database(probe)


async def versions(dsn: str, *packages: str) -> str:
    """A line naming Python, PostgreSQL and the packages used."""
    conn = await asyncpg.connect(dsn)
    try:
        server = await conn.fetchval("show server_version")
        sync = await conn.fetchval("show synchronous_commit")
        fsync = await conn.fetchval("show fsync")
    finally:
        await conn.close()
    names = ", ".join(f"{p} {metadata.version(p)}" for p in packages)
    return (
        f"Python {platform.python_version()}, PostgreSQL {server} (synchronous_commit={sync}, fsync={fsync}), {names}"
    )
