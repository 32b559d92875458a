"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.conftest import fresh_database, open_pool


# This area runs senders, which claim every due row of their channel: it gets a
# database of its own so rows written by other areas' tests never reach them.
@pytest.fixture(scope="module")
async def database_url(admin_dsn: str) -> AsyncIterator[str]:
    """This area's own freshly migrated database."""
    async with fresh_database(admin_dsn) as url:
        yield url


@pytest.fixture(scope="module")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on this area's database."""
    async with open_pool(database_url) as p:
        yield p
