"""What became of every accepted delivery, read from the queue and from the sink.

A fault run is judged by its ledger: every delivery the queue accepted is in
a final state (``sent``, ``dead``, ``dropped``, ``expired``), every ``sent``
email reached the sink, and no delivery was handed to the sink more often
than it was attempted (each attempt is one claim, so duplicates are bounded
by the channel's attempt count). The soak in ``bench/faults_soak.py`` keeps
the same books.
"""

from __future__ import annotations

import asyncio
import collections
import re
import uuid
from dataclasses import dataclass, field

import asyncpg

from tests.email.email_helpers import Capture, enqueue_messages, message
from tests.faults.processes import ServiceProcess

FINAL = ("sent", "dead", "dropped", "expired")
_DELIVERY_ID = re.compile(r"<delivery-(\d+)\.")
# The test's own connections see the same outages as the service: these mean "try again".
_AWAY = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)


async def fetch(pool: asyncpg.Pool, sql: str, *args: object, attempts: int = 200) -> list[asyncpg.Record]:
    """``pool.fetch`` that waits out a database restart (the pool reconnects)."""
    for _ in range(attempts - 1):
        try:
            return list(await pool.fetch(sql, *args))
        except _AWAY:
            await asyncio.sleep(0.05)
    return list(await pool.fetch(sql, *args))


def delivery_of(message_id: str) -> int:
    """The delivery id inside an email's Message-ID (``<delivery-N.account@domain>``)."""
    found = _DELIVERY_ID.match(message_id)
    if found is None:
        raise ValueError(f"not a Belfry Message-ID: {message_id!r}")
    return int(found.group(1))


async def enqueue_emails(pool: asyncpg.Pool, account_id: str, count: int, *, start: int = 0) -> list[uuid.UUID]:
    """``count`` email deliveries of ``account_id`` to distinct users, in one transaction."""
    msgs = [message(account_id, user_id=f"u{i}") for i in range(start, start + count)]
    return await enqueue_messages(pool, msgs)


async def states(pool: asyncpg.Pool, account_id: str, channel: str = "email") -> collections.Counter[str]:
    """How many of the account's deliveries are in each state (retrying while the database is away)."""
    rows = await fetch(
        pool,
        "select state, count(*) as n from queue.deliveries where account_id = $1 and channel = $2 group by state",
        account_id,
        channel,
    )
    return collections.Counter({r["state"]: int(r["n"]) for r in rows})


async def finished(pool: asyncpg.Pool, account_id: str, channel: str = "email") -> int:
    """How many of the account's deliveries are in a final state."""
    now = await states(pool, account_id, channel)
    return sum(now[s] for s in FINAL)


async def wait_final(
    pool: asyncpg.Pool,
    account_id: str,
    count: int,
    *,
    within: float = 60.0,
    alive: ServiceProcess | None = None,
    channel: str = "email",
) -> collections.Counter[str]:
    """Poll until ``count`` of the account's deliveries are final; fail early if ``alive`` exits.

    A bounded wait for progress, not a timing assertion: ``within`` is far
    beyond what the work needs.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        now = await states(pool, account_id, channel)
        if sum(now[s] for s in FINAL) >= count:
            return now
        if alive is not None:
            alive.assert_alive()
        if loop.time() > deadline:
            tail = f"\n{alive.tail()}" if alive is not None else ""
            raise AssertionError(f"only {dict(now)} of {count} deliveries are final after {within}s{tail}")
        await asyncio.sleep(0.05)


@dataclass
class Ledger:
    """The books of one account's email deliveries after a fault run."""

    accepted: int
    by_state: collections.Counter[str]
    handoffs: collections.Counter[int] = field(default_factory=collections.Counter)  # delivery id → times at the sink
    attempts: dict[int, int] = field(default_factory=dict)
    sent_not_at_sink: list[int] = field(default_factory=list)
    unknown_at_sink: list[int] = field(default_factory=list)

    @property
    def balanced(self) -> bool:
        """accepted = sent + dead + dropped + expired."""
        return self.accepted == sum(self.by_state[s] for s in FINAL)

    @property
    def over_attempts(self) -> dict[int, tuple[int, int]]:
        """Deliveries handed to the sink more often than attempted: id → (handoffs, attempts)."""
        return {d: (n, self.attempts.get(d, 0)) for d, n in self.handoffs.items() if n > self.attempts.get(d, 0)}

    @property
    def duplicates(self) -> int:
        """Extra handoffs beyond the first, over all deliveries."""
        return sum(n - 1 for n in self.handoffs.values() if n > 1)

    def check(self) -> None:
        """Fail with the books when anything was lost or sent beyond its attempts."""
        problems = []
        if not self.balanced:
            problems.append(f"accepted {self.accepted} but final {dict(self.by_state)}")
        if self.sent_not_at_sink:
            problems.append(f"sent but never at the sink: {self.sent_not_at_sink[:10]}")
        if self.unknown_at_sink:
            problems.append(f"at the sink but not in the queue: {self.unknown_at_sink[:10]}")
        if self.over_attempts:
            problems.append(f"handed over more often than attempted: {dict(list(self.over_attempts.items())[:10])}")
        assert not problems, "; ".join(problems)


async def ledger(pool: asyncpg.Pool, capture: Capture, account_id: str) -> Ledger:
    """Read the account's email books from the queue and the sink."""
    handoffs = collections.Counter(
        delivery_of(str(c.parsed["Message-ID"]))
        for c in capture.snapshot()
        if account_id in str(c.parsed["Message-ID"])
    )
    result = await books(pool, account_id, handoffs)
    result.unknown_at_sink = sorted(set(handoffs) - set(result.attempts))
    return result


async def books(
    pool: asyncpg.Pool, account_id: str, handoffs: collections.Counter[int], channel: str = "email"
) -> Ledger:
    """The account's books on ``channel``, given how often the peer received each delivery id (any account's)."""
    rows = await fetch(
        pool,
        "select delivery_id, state, attempts from queue.deliveries where account_id = $1 and channel = $2",
        account_id,
        channel,
    )
    known = {r["delivery_id"] for r in rows}
    mine = collections.Counter({d: n for d, n in handoffs.items() if d in known})
    return Ledger(
        accepted=len(rows),
        by_state=collections.Counter(r["state"] for r in rows),
        handoffs=mine,
        attempts={r["delivery_id"]: r["attempts"] for r in rows},
        sent_not_at_sink=[r["delivery_id"] for r in rows if r["state"] == "sent" and not mine[r["delivery_id"]]],
    )
