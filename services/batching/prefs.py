"""What batching asks the preferences service: who the user is, their time zone, quiet hours.

One ``EffectiveBatch`` call per (account, topic) and group of users; the
answer is turned into frozen dataclasses here, so protobuf stops at this edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
from belfry import channels
from belfry.api.common.v1 import common_pb2
from belfry.api.preferences.v1 import preferences_pb2, preferences_pb2_grpc
from belfry.errors import FailedPrecondition, Unavailable

_BATCH = 1000
# Answers that retrying cannot change (an unknown topic or account): the caller goes on without them.
_REFUSED = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
}  # EffectiveBatch takes at most this many users per call


@dataclass(frozen=True)
class Recipient:
    """One user's answer for one topic."""

    user_id: str
    known: bool
    email: str = ""
    display_name: str = ""
    locale: str = "en"
    time_zone: str = "UTC"
    enabled: frozenset[str] = frozenset()  # queue channels switched on for the topic
    # Preference channels switched on (the pop-up and browser flags of the bell delivery come from these).
    switched_on: frozenset[str] = frozenset()
    popup_sound: str = ""  # empty when muted, in quiet hours, or the pop-up is off
    in_quiet_hours: bool = False
    quiet_until: datetime | None = None


@dataclass(frozen=True)
class Answer:
    """Recipients by user id, and whether the topic is locked (locked topics bypass quiet hours)."""

    recipients: dict[str, Recipient]
    locked: bool


class Preferences:
    """A client of ``PreferencesService.EffectiveBatch`` over one reused channel."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float = 5.0) -> None:
        self._stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
        self._timeout = timeout

    async def effective(self, account_id: str, topic: str, user_ids: Sequence[str]) -> Answer:
        """The recipients' decisions for ``topic``.

        Raises Unavailable when preferences cannot answer now (retry later) and
        FailedPrecondition when it refuses the question (retrying cannot help).
        """
        recipients: dict[str, Recipient] = {}
        locked = False
        unique = list(dict.fromkeys(user_ids))
        for start in range(0, len(unique), _BATCH):
            request = preferences_pb2.EffectiveBatchRequest(
                account_id=account_id, topic=topic, user_ids=unique[start : start + _BATCH]
            )
            try:
                response = await self._stub.EffectiveBatch(request, timeout=self._timeout)
            except grpc.aio.AioRpcError as exc:
                message = f"preferences did not answer for {topic}: {exc.code().name} {exc.details()}"
                if exc.code() in _REFUSED:
                    raise FailedPrecondition(message) from exc
                raise Unavailable(message) from exc
            locked = response.topic.locked
            for r in response.recipients:
                recipients[r.user_id] = _recipient(r)
        return Answer(recipients, locked)


def _recipient(r: preferences_pb2.RecipientDecision) -> Recipient:
    quiet_until = r.quiet_until.ToDatetime(tzinfo=UTC) if r.in_quiet_hours and r.HasField("quiet_until") else None
    switched_on = frozenset(
        channels.BY_VALUE[c.channel].name for c in r.channels if c.enabled and c.channel in channels.BY_VALUE
    )
    return Recipient(
        user_id=r.user_id,
        known=r.known,
        email=r.email,
        display_name=r.display_name,
        locale=r.locale or "en",
        time_zone=r.time_zone or "UTC",
        enabled=frozenset(channels.queue_channels(switched_on)),
        switched_on=switched_on,
        popup_sound=next((c.sound for c in r.channels if c.channel == common_pb2.CHANNEL_POPUP and c.enabled), ""),
        in_quiet_hours=r.in_quiet_hours and quiet_until is not None,
        quiet_until=quiet_until,
    )
