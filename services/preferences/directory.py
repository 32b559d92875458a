"""The directory: accounts, users and teams, validated before anything is written."""

from __future__ import annotations

from collections.abc import Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg
from belfry import text
from belfry.errors import InvalidArgument, NotFound

from services.preferences import store
from services.preferences.model import Account, Team, User

MAX_ID = 128


def check_id(value: str, field: str) -> str:
    """A non-empty identifier of reasonable length that PostgreSQL can store."""
    if not value or len(value) > MAX_ID or value != value.strip():
        raise InvalidArgument(f"{field} must be 1 to {MAX_ID} characters without surrounding spaces", field=field)
    return text.check_storable(value, field)


def check_time_zone(value: str, field: str) -> str:
    """An IANA time zone name."""
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidArgument(
            f"unknown time zone {value!r}; use an IANA name such as Europe/Paris", field=field
        ) from None
    return value


def check_user(user: User) -> User:
    """Reject a user record that could not be notified correctly (or stored)."""
    text.check_record(user, "user")
    check_id(user.account_id, "user.account_id")
    check_id(user.user_id, "user.user_id")
    local, _, domain = user.email.partition("@")
    if not local or "." not in domain or len(user.email) > 320 or any(c in user.email for c in " \r\n<>,"):
        raise InvalidArgument(f"user.email {user.email!r} is not an email address", field="user.email")
    check_time_zone(user.time_zone, "user.time_zone")
    if len(user.display_name) > 200:
        raise InvalidArgument("user.display_name is longer than 200 characters", field="user.display_name")
    return user


class Directory:
    """Reads and writes of the directory over one pool."""

    def __init__(self, pool: asyncpg.Pool, max_batch: int) -> None:
        self._pool = pool
        self._max_batch = max_batch

    async def upsert_account(self, account: Account) -> Account:
        """Create or update an account."""
        check_id(account.account_id, "account.account_id")
        text.check_record(account, "account")
        async with self._pool.acquire() as conn, conn.transaction():
            return await store.upsert_account(conn, account)

    async def get_account(self, account_id: str) -> Account:
        """The account; NotFound when absent."""
        check_id(account_id, "account_id")
        async with self._pool.acquire() as conn:
            return await store.require_account(conn, account_id)

    async def upsert_user(self, user: User) -> User:
        """Create or update a user of an existing account."""
        check_user(user)
        async with self._pool.acquire() as conn, conn.transaction():
            return await store.upsert_user(conn, user)

    async def get_users(self, account_id: str, user_ids: Sequence[str]) -> list[User]:
        """The named users that exist, in request order."""
        check_id(account_id, "account_id")
        self.check_batch(user_ids, "user_ids")
        async with self._pool.acquire() as conn:
            found = await store.get_users(conn, account_id, user_ids)
        return [found[u] for u in dict.fromkeys(user_ids) if u in found]

    def check_batch(self, user_ids: Sequence[str], field: str) -> None:
        """At most ``max_batch`` ids per call, each one PostgreSQL can store."""
        if len(user_ids) > self._max_batch:
            raise InvalidArgument(
                f"{field} names {len(user_ids)} users; at most {self._max_batch} per call, split the request",
                field=field,
            )
        text.check_all(user_ids, field)

    async def upsert_team(self, team: Team) -> Team:
        """Create or replace a team and its members."""
        check_id(team.account_id, "team.account_id")
        check_id(team.team_id, "team.team_id")
        text.check_record(team, "team")
        ids = [m.user_id for m in team.members]
        if len(set(ids)) != len(ids):
            raise InvalidArgument("team.members names a user twice", field="team.members")
        self.check_batch(ids, "team.members")
        async with self._pool.acquire() as conn, conn.transaction():
            known = await store.get_users(conn, team.account_id, ids)
            missing = [u for u in ids if u not in known]
            if missing:
                raise NotFound(f"team members {missing[:5]} are not users of this account", field="team.members")
            return await store.upsert_team(conn, team)

    async def get_team(self, account_id: str, team_id: str) -> Team:
        """The team; NotFound when absent."""
        check_id(account_id, "account_id")
        check_id(team_id, "team_id")
        async with self._pool.acquire() as conn:
            team = await store.get_team(conn, account_id, team_id)
        if team is None:
            raise NotFound(f"team {team_id!r} does not exist in account {account_id!r}", field="team_id")
        return team
