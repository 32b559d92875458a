"""The dispatcher's view of the preferences service (and its directory).

One ``EffectiveBatch`` call answers, for one topic, every recipient's
channels, quiet hours and directory facts; ``GetTeam`` names a team's
primary members. Answers become domain types here, and the peer's errors
become ours with a message that says where they came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC

import grpc
from belfry import channels, errors
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.api.preferences.v1 import preferences_pb2, preferences_pb2_grpc

from services.dispatcher.model import ChannelChoice, Recipient, Topic

CHUNK = 1000  # EffectiveBatch's limit per call


def _translate(exc: grpc.aio.AioRpcError, what: str) -> errors.BelfryError:
    """The peer's status as one of our typed errors."""
    code = exc.code()
    message = f"{what}: {exc.details()}"
    if code == grpc.StatusCode.NOT_FOUND:
        return errors.NotFound(message, field="event.topic" if "topic" in (exc.details() or "") else None)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return errors.InvalidArgument(message)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return errors.PermissionDenied(message)
    return errors.Unavailable(f"{what} failed ({code.name}); retry later")


class Preferences:
    """Calls to the preferences service over one long-lived channel."""

    def __init__(self, channel: grpc.aio.Channel, *, deadline: float = 5.0) -> None:
        self._prefs = preferences_pb2_grpc.PreferencesServiceStub(channel)
        self._directory = directory_pb2_grpc.DirectoryServiceStub(channel)
        self._deadline = deadline

    async def effective(
        self, account_id: str, topic: str, user_ids: Sequence[str]
    ) -> tuple[Topic, dict[str, Recipient]]:
        """The topic and each user's decision (``user_ids`` may exceed one call's limit)."""
        info: Topic | None = None
        found: dict[str, Recipient] = {}
        for start in range(0, max(1, len(user_ids)), CHUNK):
            request = preferences_pb2.EffectiveBatchRequest(
                account_id=account_id, topic=topic, user_ids=list(user_ids[start : start + CHUNK])
            )
            try:
                answer = await self._prefs.EffectiveBatch(request, timeout=self._deadline)
            except grpc.aio.AioRpcError as exc:
                raise _translate(exc, f"preferences for topic {topic!r}") from exc
            info = info or _topic(answer.topic)
            for r in answer.recipients:
                found[r.user_id] = _recipient(r)
        assert info is not None
        return info, found

    async def primary_members(self, account_id: str, team_id: str) -> list[str]:
        """The team's primary members, from the directory."""
        try:
            answer = await self._directory.GetTeam(
                directory_pb2.GetTeamRequest(account_id=account_id, team_id=team_id), timeout=self._deadline
            )
        except grpc.aio.AioRpcError as exc:
            error = _translate(exc, f"team {team_id!r}")
            error.field = "event.team_id"
            raise error from exc
        return [m.user_id for m in answer.team.members if m.primary]


def _topic(t: preferences_pb2.TopicInfo) -> Topic:
    return Topic(
        key=t.key,
        locked=t.locked,
        ttl_seconds=int(t.ttl_seconds) or 7 * 86400,
        category=t.category,
        batching=t.batching,
        allowed_channels=tuple(channels.BY_VALUE[c].name for c in t.allowed_channels if c in channels.BY_VALUE),
    )


def _recipient(r: preferences_pb2.RecipientDecision) -> Recipient:
    return Recipient(
        user_id=r.user_id,
        known=r.known,
        email=r.email,
        display_name=r.display_name,
        locale=r.locale or "en",
        time_zone=r.time_zone or "UTC",
        channels=tuple(
            ChannelChoice(channels.BY_VALUE[c.channel].name, c.enabled, c.reason, c.sound)
            for c in r.channels
            if c.channel in channels.BY_VALUE
        ),
        in_quiet_hours=r.in_quiet_hours,
        quiet_until=r.quiet_until.ToDatetime(tzinfo=UTC) if r.HasField("quiet_until") else None,
    )
