"""Fixtures of the fault tests: a private PostgreSQL cluster, a fresh database on it per test.

The cluster is this area's own (tests restart and crash it) and is shared by
its tests, which run one at a time; each test gets a freshly migrated
database on it (``tests.conftest.fresh_database``, the runner every test
area uses), so the senders it starts see only its rows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.conftest import fresh_database, open_pool
from tests.faults import postgres
from tests.faults.postgres import PrivatePostgres


def via_port(url: str, port: int) -> str:
    """``url`` with its port replaced (to go through a fault proxy)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}"))


@pytest.fixture(scope="session")
async def private_pg() -> AsyncIterator[PrivatePostgres]:
    """This area's own PostgreSQL cluster, which its tests may crash and restart."""
    reason = postgres.available()
    if reason is not None:
        pytest.skip(reason)
    pg = await PrivatePostgres.create()
    yield pg
    await pg.destroy()


@pytest.fixture
async def database_url(private_pg: PrivatePostgres) -> AsyncIterator[str]:
    """A freshly migrated database on the private cluster, dropped afterwards."""
    if not private_pg.running:
        await private_pg.start()
    async with fresh_database(private_pg.admin_dsn) as url:
        yield url
        if not private_pg.running:  # a test that failed while the server was down: bring it back to drop
            await private_pg.start()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """The test's own pool on its database (call ``expire_connections()`` after a restart)."""
    async with open_pool(database_url) as p:
        yield p
