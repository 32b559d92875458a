"""Leases with fencing tokens: the one rule every leased table follows (queue deliveries, windows, digests).

Taking a lease gives the row a fresh token from a sequence, an expiry and the
holder's name; every later change the holder makes is fenced by that token, so
once its lease ran out and another replica took the row, its late writes match
nothing. Tables name the columns differently: a ``Leases`` names them once per
table and writes the SQL fragments (``$n`` and ``now()`` are the caller's).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Leases:
    """The lease columns of one table; fenced statements take its ``keys`` as $1.. and the token after them."""

    table: str
    keys: tuple[str, ...]
    sequence: str  # where fresh tokens come from
    until: str = "lease_until"
    holder: str = "lease_by"
    token: str = "lease_token"  # noqa: S105 - a column name, not a secret

    def take(self, until: str, holder: str) -> str:
        """SET: a fresh token, held by ``holder`` until ``until``."""
        return f"{self.token} = nextval('{self.sequence}'), {self.until} = {until}, {self.holder} = {holder}"

    def fence(self, token: str, alias: str = "") -> str:
        """WHERE: the lease ``token`` names still holds the row (a stale token matches nothing)."""
        return f"{alias}{self.token} = {token}"

    def held(self) -> str:
        """WHERE: the row keyed $1.., still under the lease whose token follows the keys."""
        keys = [f"{k} = ${i}" for i, k in enumerate(self.keys, 1)]
        return " and ".join([*keys, self.fence(f"${len(self.keys) + 1}")])

    def release(self) -> str:
        """SET: nobody holds the row."""
        return f"{self.token} = null, {self.until} = null, {self.holder} = null"

    def hold_off(self, until: str) -> str:
        """SET: give the row up but let nobody take it before ``until`` (taking it then bumps the token)."""
        return f"{self.until} = {until}, {self.holder} = null"

    def free(self, now: str) -> str:
        """WHERE: nobody holds the row at ``now`` (never leased, released, or its lease ran out)."""
        return f"({self.until} is null or {self.until} <= {now})"

    def expired(self, now: str) -> str:
        """WHERE: a lease was taken and ran out before ``now`` (its holder died or stalled)."""
        return f"{self.until} < {now}"

    def claim(self, due: str, order: str, returning: str, also: str = "") -> str:
        """Lease up to $4 rows ``due`` and free at $1, until $2, for $3, skipping rows locked elsewhere.

        The leased row is ``x`` (``also`` may SET more of it); its token is returned as ``token``."""
        match = " and ".join(f"x.{k} = due.{k}" for k in self.keys)
        return f"""
            update {self.table} x set {self.take("$2", "$3")}{also}
            from (select {", ".join(self.keys)} from {self.table} where {due} and {self.free("$1")}
                  order by {order} limit $4 for update skip locked) due
            where {match} returning {returning}, x.{self.token} as token"""

    def fenced(self, changes: str, also: str = "") -> str:
        """UPDATE the row ``held`` names with ``changes`` (parameters after the token), or nothing when stale."""
        return f"update {self.table} set {changes} where {self.held()}{also}"
