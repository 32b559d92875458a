"""The queue tests get a database of their own, per module.

They reason about *every* due row of a channel (fairness bounds, claim
sizes, idle wake-ups), so rows left by other areas' tests in the shared
session database must not be visible to them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.conftest import fresh_database, open_pool


@pytest.fixture(scope="module")
async def database_url(admin_dsn: str) -> AsyncIterator[str]:
    """A freshly migrated database for this module only."""
    async with fresh_database(admin_dsn) as url:
        yield url


@pytest.fixture(scope="module")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on this module's database."""
    async with open_pool(database_url) as p:
        yield p
