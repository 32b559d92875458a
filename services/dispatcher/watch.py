"""WatchStatus: an account's status changes as they happen, at least once, from a resume point.

The changes are read from what the senders, the email service and the gateway
already record (``status_store.changes_since``), so following them writes
nothing on the delivery path. Each reading takes everything at or after the
stream's position, sends what this stream has not sent yet, and moves the
position to ``margin`` before the reading's time: a change is stamped when
its transaction starts and becomes visible when it commits, so one stamped
just before a reading may commit just after it. Every write behind these
changes is one short statement, which commits well within the margin (10 s
by default); a change whose transaction took longer than that to commit
could be missed, and the margin is the setting that bounds it.

The position is the resume token: resuming re-reads from it, so changes of
the last ``margin`` before a disconnect may come again (at least once).
Changes older than each source's retention are gone (finished deliveries:
``BELFRY_QUEUE_RETENTION_SECONDS``, 7 days by default).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
from belfry import errors

from services.dispatcher import status_store


@dataclass(frozen=True)
class Tuning:
    """How a stream reads its changes."""

    poll_seconds: float = 1.0  # between readings once it has caught up
    margin_seconds: float = 10.0  # how late a change may become visible after its time and still be sent
    heartbeat_seconds: float = 15.0  # an empty answer (with a fresh token) at least this often
    limit: int = 1000  # changes per source and reading


def encode_token(position: datetime) -> str:
    """An opaque token for a stream position."""
    return base64.urlsafe_b64encode(f"v1|{position.isoformat()}".encode()).decode()


def decode_token(token: str) -> datetime:
    """The position a token names; InvalidArgument for anything this API did not issue."""
    try:
        version, _, at = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
        position = datetime.fromisoformat(at)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.InvalidArgument(
            "resume_token is not a token this API issued; resume from one it sent, or leave it empty",
            field="resume_token",
        ) from exc
    if version != "v1" or position.tzinfo is None:
        raise errors.InvalidArgument("resume_token is not a token this API issued", field="resume_token")
    return position


class Watch:
    """Reads accounts' changes for streams; each ``follow`` keeps its own position (one per stream)."""

    def __init__(self, pool: asyncpg.Pool, tuning: Tuning = Tuning()) -> None:
        self._pool = pool
        self._tuning = tuning

    async def follow(
        self, account_id: str, since: datetime | None
    ) -> AsyncIterator[tuple[list[status_store.Change], datetime]]:
        """Yield ``(changes not sent yet, the position to resume from after them)`` until cancelled.

        ``since`` None: from the first reading's time on.
        """
        t = self._tuning
        margin = timedelta(seconds=t.margin_seconds)
        position = since
        sent: dict[tuple[tuple[str, str, str], datetime], None] = {}  # what this stream sent at or after position
        limit = t.limit
        quiet_since = asyncio.get_running_loop().time()
        while True:
            if position is None:
                position = await self._pool.fetchval("select now()")
                assert position is not None
            now, changes, read_on = await status_store.changes_since(self._pool, account_id, position, limit)
            fresh = [c for c in changes if (c.key, c.at) not in sent]
            if read_on is not None:
                # A source had more: read on from its cut, at once; a cut that gives nothing new (more
                # changes at one time than the limit, e.g. one statement expiring many) reads more at once.
                limit = limit * 2 if read_on <= position else t.limit
                step = max(position, read_on)
            else:
                limit = t.limit
                step = max(position, now - margin)
            for c in fresh:
                sent[(c.key, c.at)] = None
            for seen in [k for k in sent if k[1] < step]:
                del sent[seen]
            position = step
            clock = asyncio.get_running_loop().time()
            if fresh or clock - quiet_since >= t.heartbeat_seconds:
                quiet_since = clock
                yield fresh, position
            if read_on is None:
                await asyncio.sleep(t.poll_seconds)
