"""SQL of the directory: accounts, users and teams."""

from __future__ import annotations

from collections.abc import Sequence

from belfry.errors import NotFound

from services.preferences.model import (
    Account,
    Team,
    TeamMember,
    User,
)
from services.preferences.store.common import USER_COLUMNS, Conn, bump_seq, user_from_row


async def upsert_account(conn: Conn, account: Account) -> Account:
    """Create or update an account."""
    await conn.execute(
        """insert into preferences.accounts (account_id, name, tier) values ($1, $2, $3)
           on conflict (account_id) do update set name = excluded.name, tier = excluded.tier, updated_at = now()""",
        account.account_id,
        account.name,
        account.tier,
    )
    await bump_seq(conn, account.account_id, "")
    return account


async def get_account(conn: Conn, account_id: str) -> Account | None:
    """The account, or None."""
    row = await conn.fetchrow(
        "select account_id, name, tier from preferences.accounts where account_id = $1", account_id
    )
    return None if row is None else Account(row["account_id"], row["name"], row["tier"])


async def require_account(conn: Conn, account_id: str, *, field: str = "account_id") -> Account:
    """The account, or NotFound naming it."""
    account = await get_account(conn, account_id)
    if account is None:
        raise NotFound(f"account {account_id!r} does not exist; create it with UpsertAccount first", field=field)
    return account


async def upsert_user(conn: Conn, user: User) -> User:
    """Create or update a user (the account must exist)."""
    await require_account(conn, user.account_id, field="user.account_id")
    await bump_seq(conn, user.account_id, user.user_id)
    row = await conn.fetchrow(
        f"""insert into preferences.users ({USER_COLUMNS}) values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
            on conflict (account_id, user_id) do update set email = excluded.email,
              display_name = excluded.display_name, locale = excluded.locale, time_zone = excluded.time_zone,
              permission_set = excluded.permission_set, tool_access = excluded.tool_access,
              super_admin = excluded.super_admin, active = excluded.active, updated_at = now()
            returning {USER_COLUMNS}""",
        user.account_id,
        user.user_id,
        user.email,
        user.display_name,
        user.locale,
        user.time_zone,
        user.permission_set,
        list(user.tool_access),
        user.super_admin,
        user.active,
    )
    assert row is not None  # an upsert with RETURNING always returns its row
    return user_from_row(row)


async def get_users(conn: Conn, account_id: str, user_ids: Sequence[str]) -> dict[str, User]:
    """The named users of one account that exist, by id."""
    rows = await conn.fetch(
        f"select {USER_COLUMNS} from preferences.users where account_id = $1 and user_id = any($2::text[])",
        account_id,
        list(user_ids),
    )
    return {r["user_id"]: user_from_row(r) for r in rows}


async def upsert_team(conn: Conn, team: Team) -> Team:
    """Create or replace a team and its members (the account must exist)."""
    await require_account(conn, team.account_id, field="team.account_id")
    await conn.execute(
        """insert into preferences.teams (account_id, team_id, name) values ($1, $2, $3)
           on conflict (account_id, team_id) do update set name = excluded.name""",
        team.account_id,
        team.team_id,
        team.name,
    )
    await conn.execute(
        "delete from preferences.team_members where account_id = $1 and team_id = $2", team.account_id, team.team_id
    )
    await conn.executemany(
        "insert into preferences.team_members (account_id, team_id, user_id, is_primary) values ($1, $2, $3, $4)",
        [(team.account_id, team.team_id, m.user_id, m.primary) for m in team.members],
    )
    return team


async def get_team(conn: Conn, account_id: str, team_id: str) -> Team | None:
    """The team with its members (ordered by user id), or None."""
    row = await conn.fetchrow(
        "select name from preferences.teams where account_id = $1 and team_id = $2", account_id, team_id
    )
    if row is None:
        return None
    members = await conn.fetch(
        """select user_id, is_primary from preferences.team_members
           where account_id = $1 and team_id = $2 order by user_id""",
        account_id,
        team_id,
    )
    return Team(account_id, team_id, row["name"], tuple(TeamMember(m["user_id"], m["is_primary"]) for m in members))
