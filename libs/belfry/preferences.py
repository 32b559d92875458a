"""The one client of the preferences service (and its directory) for the other services.

``EffectiveBatch`` answers, for one topic, every recipient's channels, quiet
hours and directory facts, and the topic itself (lock, time to live, labels);
``GetTeam`` names a team's primary members; ``GetUsers`` gives a user's
standing (``member``: active, super admin) to services that authorize a
user's call; ``Unsubscribe`` is an email link's effect. Answers become the frozen dataclasses below here, so protobuf
stops at this edge.

The peer's status becomes one of our typed errors here, and only here:

| peer answers | raised | meaning for the caller |
| --- | --- | --- |
| NOT_FOUND | ``NotFound`` | an unknown account, topic or team: retrying cannot help |
| INVALID_ARGUMENT | ``InvalidArgument`` | the question is malformed: retrying cannot help |
| FAILED_PRECONDITION | ``FailedPrecondition`` | refused in the current state (e.g. a locked topic): not a retry |
| PERMISSION_DENIED | ``PermissionDenied`` | refused to this caller |
| anything else (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, ...) | ``Unavailable`` | retry later |

A refusal keeps the peer's message and its BadRequest field (prefixed with
``field_prefix``, e.g. ``event.`` for the dispatcher's producers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from belfry import channels, errors, i18n
from belfry.api.directory.v1 import directory_pb2, directory_pb2_grpc
from belfry.api.preferences.v1 import preferences_pb2, preferences_pb2_grpc

CHUNK = 1000  # EffectiveBatch's limit per call

_REFUSALS: dict[grpc.StatusCode, type[errors.BelfryError]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
}
# The errors that mean "refused": asking again will get the same answer.
REFUSED: tuple[type[errors.BelfryError], ...] = tuple(_REFUSALS.values())


@dataclass(frozen=True)
class ChannelChoice:
    """Preferences' answer for one channel of one recipient."""

    channel: str
    enabled: bool
    reason: str = ""
    sound: str = ""  # the pop-up's sound; empty when muted, in quiet hours or not a pop-up


@dataclass(frozen=True)
class Recipient:
    """Preferences' answer for one user: directory facts, channels, quiet hours."""

    user_id: str
    known: bool  # False: not an active member of the account
    email: str = ""
    display_name: str = ""
    locale: str = "en"
    time_zone: str = "UTC"
    channels: tuple[ChannelChoice, ...] = ()
    in_quiet_hours: bool = False  # always with ``quiet_until``
    quiet_until: datetime | None = None

    @property
    def on(self) -> frozenset[str]:
        """The preference channels switched on for the topic."""
        return frozenset(c.channel for c in self.channels if c.enabled)

    @property
    def popup_sound(self) -> str:
        """The pop-up's sound ("" when the pop-up is off, muted or in quiet hours)."""
        return next((c.sound for c in self.channels if c.channel == "popup" and c.enabled), "")

    def held_until(self, locked: bool) -> datetime | None:
        """When deliveries to this user are released: the end of quiet hours (None: now; locked topics bypass them)."""
        return self.quiet_until if self.in_quiet_hours and not locked else None


@dataclass(frozen=True)
class Topic:
    """What a sender of notifications needs to know about a topic."""

    key: str
    locked: bool
    ttl_seconds: int
    category: str
    batching: str  # "assignment" | "digest" | ""
    allowed_channels: tuple[str, ...]
    labels: Mapping[str, str] = field(default_factory=dict)  # the topic's name per language

    def label(self, locale: str) -> str:
        """The topic's name in the locale's language (then English, then a readable key)."""
        return i18n.pick(self.labels, locale) or self.key.rpartition(".")[2].replace("_", " ").capitalize()


@dataclass(frozen=True)
class Member:
    """A user's standing in the directory, for authorization decisions (roles come from here, never a token)."""

    user_id: str
    active: bool
    super_admin: bool


def translate(exc: grpc.aio.AioRpcError, what: str, *, field_prefix: str = "") -> errors.BelfryError:
    """The peer's status as one of our typed errors (the table in this module's docstring)."""
    refusal = _REFUSALS.get(exc.code())
    if refusal is None:
        return errors.Unavailable(
            f"preferences did not answer for {what} ({exc.code().name}: {exc.details()}); retry later"
        )
    peer_field = _field(exc)
    return refusal(
        f"preferences for {what}: {exc.details()}", field=f"{field_prefix}{peer_field}" if peer_field else None
    )


def _field(exc: grpc.aio.AioRpcError) -> str | None:
    """The request field the peer named in a BadRequest detail, if any."""
    try:
        status = rpc_status.from_call(exc)
    except ValueError:
        return None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                return str(bad.field_violations[0].field)
    return None


@dataclass(frozen=True)
class UnsubscribeTopic:
    """An unsubscribe link's topic as its page names it."""

    label: str  # in the user's language
    language: str  # belfry.i18n language of the user's profile locale
    locked: bool  # always sent: the unsubscribe is refused


class Preferences:
    """Calls to the preferences service over one long-lived channel."""

    def __init__(self, channel: grpc.aio.Channel, *, deadline: float = 5.0, field_prefix: str = "") -> None:
        self._prefs = preferences_pb2_grpc.PreferencesServiceStub(channel)
        self._directory = directory_pb2_grpc.DirectoryServiceStub(channel)
        self._deadline = deadline
        self._prefix = field_prefix

    async def effective(
        self, account_id: str, topic: str, user_ids: Sequence[str]
    ) -> tuple[Topic, dict[str, Recipient]]:
        """The topic and each user's decision (any number of users; none only checks the topic)."""
        info: Topic | None = None
        found: dict[str, Recipient] = {}
        unique = list(dict.fromkeys(user_ids))
        for start in range(0, max(1, len(unique)), CHUNK):
            request = preferences_pb2.EffectiveBatchRequest(
                account_id=account_id, topic=topic, user_ids=unique[start : start + CHUNK]
            )
            try:
                answer = await self._prefs.EffectiveBatch(request, timeout=self._deadline)
            except grpc.aio.AioRpcError as exc:
                raise translate(exc, f"topic {topic!r}", field_prefix=self._prefix) from exc
            info = info or _topic(answer.topic)
            for r in answer.recipients:
                found[r.user_id] = _recipient(r)
        assert info is not None
        return info, found

    async def primary_members(self, account_id: str, team_id: str) -> list[str]:
        """The team's primary members, from the directory."""
        request = directory_pb2.GetTeamRequest(account_id=account_id, team_id=team_id)
        try:
            answer = await self._directory.GetTeam(request, timeout=self._deadline)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, f"team {team_id!r}", field_prefix=self._prefix) from exc
        return [m.user_id for m in answer.team.members if m.primary]

    async def member(self, account_id: str, user_id: str) -> Member | None:
        """The user's standing in the directory (None: not a user of the account)."""
        request = directory_pb2.GetUsersRequest(account_id=account_id, user_ids=[user_id])
        try:
            answer = await self._directory.GetUsers(request, timeout=self._deadline)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, f"user {user_id!r}", field_prefix=self._prefix) from exc
        found = next((u for u in answer.users if u.user_id == user_id), None)
        return None if found is None else Member(found.user_id, active=found.active, super_admin=found.super_admin)

    async def unsubscribe(
        self, account_id: str, user_id: str, topic: str, *, preview: bool = False
    ) -> UnsubscribeTopic:
        """An email link's effect: ``topic`` off for email for the user (the link was verified by the caller).

        With ``preview``, nothing changes: only the topic as the link's page names it.
        """
        request = preferences_pb2.UnsubscribeRequest(
            account_id=account_id, user_id=user_id, topic=topic, preview=preview
        )
        try:
            answer = await self._prefs.Unsubscribe(request, timeout=self._deadline)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, f"the unsubscribe from {topic!r}", field_prefix=self._prefix) from exc
        return UnsubscribeTopic(answer.topic_label, answer.language, answer.locked)


def _topic(t: preferences_pb2.TopicInfo) -> Topic:
    return Topic(
        key=t.key,
        locked=t.locked,
        ttl_seconds=int(t.ttl_seconds) or 7 * 86400,
        category=t.category,
        batching=t.batching,
        allowed_channels=tuple(channels.BY_VALUE[c].name for c in t.allowed_channels if c in channels.BY_VALUE),
        labels=dict(t.labels),
    )


def _recipient(r: preferences_pb2.RecipientDecision) -> Recipient:
    quiet_until = r.quiet_until.ToDatetime(tzinfo=UTC) if r.in_quiet_hours and r.HasField("quiet_until") else None
    return Recipient(
        user_id=r.user_id,
        known=r.known,
        email=r.email,
        display_name=r.display_name,
        locale=r.locale or i18n.DEFAULT,
        time_zone=r.time_zone or "UTC",
        channels=tuple(
            ChannelChoice(channels.BY_VALUE[c.channel].name, c.enabled, c.reason, c.sound)
            for c in r.channels
            if c.channel in channels.BY_VALUE
        ),
        in_quiet_hours=quiet_until is not None,
        quiet_until=quiet_until,
    )
