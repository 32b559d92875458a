"""The migration runner: forward only, checksums, one runner at a time."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
from belfry.errors import FailedPrecondition
from belfry.migrate import Migration, migrate


async def test_applies_once_concurrently_and_refuses_edits(database_url: str) -> None:
    owner = f"t{uuid.uuid4().hex[:8]}"
    table = f"public.{owner}_things"
    files = [
        Migration(owner, "0001_create", f"create table {table} (id int primary key)"),
        Migration(owner, "0002_seed", f"insert into {table} values (1)"),
    ]
    conns = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        # Three replicas racing: the advisory lock lets exactly one apply each file.
        applied = await asyncio.gather(*(migrate(c, files) for c in conns))
        assert sorted(len(a) for a in applied) == [0, 0, 2]
        assert await conns[0].fetchval(f"select count(*) from {table}") == 1
        edited = [files[0], Migration(owner, "0002_seed", f"insert into {table} values (2)")]
        with pytest.raises(FailedPrecondition, match="was edited after it was applied"):
            await migrate(conns[0], edited)
        # A failing file rolls back whole and is not recorded.
        broken = [*files, Migration(owner, "0003_broken", f"insert into {table} values (3); select 1/0")]
        with pytest.raises(asyncpg.DivisionByZeroError):
            await migrate(conns[0], broken)
        assert await conns[0].fetchval(f"select count(*) from {table}") == 1
        recorded = await conns[0].fetchval(
            "select count(*) from public.belfry_schema_migrations where owner = $1", owner
        )
        assert recorded == 2
    finally:
        for c in conns:
            await c.close()
