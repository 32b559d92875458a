"""The status API's answers: stored decisions and queue rows as timelines."""

from __future__ import annotations

import base64
import uuid
from datetime import datetime, timedelta

from belfry import channels, errors
from belfry.api.common.v1 import common_pb2
from belfry.api.dispatcher.v1 import dispatcher_pb2 as pb

from services.dispatcher import status_store as store

_CHANNEL_ENUMS = {c.name: c.value for c in channels.PREFERENCE}
_DECISION_STATES = {
    "accepted": pb.STATE_ACCEPTED,
    "suppressed": pb.STATE_SUPPRESSED,
    "held": pb.STATE_HELD,
    "batched": pb.STATE_BATCHED,
}
# What a delivery's Sent outcome means, per channel: the next hop's answer the sender waited for.
_SENT = {
    "email": (pb.STATE_RELAYED, "accepted by the SMTP relay"),
    "browser": (pb.STATE_DELIVERED, "accepted by the browser's push service"),
    "mobile": (pb.STATE_DELIVERED, "accepted by FCM or APNs"),
    "other_apps": (pb.STATE_DELIVERED, "acknowledged by the webhook"),
}
_FEEDBACK = {"complaint": pb.STATE_COMPLAINED}  # bounces of either kind: STATE_BOUNCED
# Queue states (belfry.queue) → the API's words.
_QUEUE_STATES = {
    "leased": pb.STATE_SENDING,
    "sent": pb.STATE_SENT,
    "failed": pb.STATE_FAILED,
    "dead": pb.STATE_FAILED,
    "expired": pb.STATE_EXPIRED,
    "dropped": pb.STATE_DROPPED,
}


def _entry(state: int, at: datetime | None, reason: str = "") -> pb.TimelineEntry:
    entry = pb.TimelineEntry(state=state, reason=reason)  # type: ignore[arg-type]  # enum values are ints
    if at is not None:
        entry.at.FromDatetime(at)
    return entry


def timeline(d: store.DeliveryRecord) -> list[pb.TimelineEntry]:
    """A delivery's life: queued (or held until its release), then where it stands now."""
    held = d.available_at - d.created_at > timedelta(seconds=1)
    first = (
        _entry(pb.STATE_HELD, d.created_at, f"until {d.available_at.isoformat()}")
        if held
        else _entry(pb.STATE_QUEUED, d.created_at)
    )
    entries = [first]
    if (outcome := _outcome(d.channel, d.state, d.finished_at, d.last_error)) is not None:
        entries.append(outcome)
    elif d.state == "queued" and d.attempts:
        entries.append(_entry(pb.STATE_QUEUED, d.available_at, f"retry after: {d.last_error}"))
    entries.extend(_entry(_FEEDBACK.get(f.kind, pb.STATE_BOUNCED), f.at, _said(f)) for f in d.feedback)
    return entries


def _outcome(channel: str, state: str, at: datetime | None, error: str) -> pb.TimelineEntry | None:
    """Where a delivery stands once a sender took it: what the next hop answered, or the queue's word."""
    if state == "sent" and channel in _SENT:
        word, said = _SENT[channel]
        return _entry(word, at, said)
    return _entry(_QUEUE_STATES[state], at, error) if state in _QUEUE_STATES else None


def _said(f: store.Feedback) -> str:
    return f"{f.kind} {f.status}: {f.detail}"


def change(c: store.Change) -> pb.StatusChange:
    """One change of a ``WatchStatus`` stream, in the words of the timeline."""
    if c.state == "read":
        entry = _entry(pb.STATE_READ, c.at)
    elif isinstance(c.what, store.Feedback):
        entry = _entry(_FEEDBACK.get(c.what.kind, pb.STATE_BOUNCED), c.at, _said(c.what))
    else:
        entry = _outcome(c.channel, c.state, c.at, c.reason) or _entry(pb.STATE_UNSPECIFIED, c.at, c.state)
    return pb.StatusChange(
        notification_id=str(c.notification_id), user_id=c.user_id, queue_channel=c.channel, entry=entry
    )


def handed_over(
    d: store.DeliveryRecord, outcome: store.BatchingOutcome | None, notification_id: uuid.UUID
) -> list[pb.TimelineEntry]:
    """The ``batching`` delivery's life: the queue's entries, then what batching did with the assignment.

    A window holding this assignment alone sends this very notification ("sent on
    its own"); otherwise it went out inside the merged notification it names.
    """
    entries = timeline(d)
    if outcome is None:
        return entries
    if outcome.outcome == "held":
        entries.append(_entry(pb.STATE_HELD, d.finished_at, f"assignment window until {outcome.at.isoformat()}"))
    elif outcome.outcome == "withdrawn":
        entries.append(_entry(pb.STATE_WITHDRAWN, outcome.at, outcome.reason))
    elif outcome.outcome == "merged" and outcome.merged_into == notification_id:
        entries.append(_entry(pb.STATE_SENT, outcome.at, "sent on its own when its assignment window closed"))
    elif outcome.outcome == "merged":
        entries.append(_entry(pb.STATE_MERGED, outcome.at, f"merged into {outcome.merged_into}"))
    else:
        entries.append(_entry(pb.STATE_DROPPED, outcome.at, outcome.reason))
    return entries


def _deliveries(r: store.RecipientRecord, notification_id: uuid.UUID) -> list[pb.DeliveryStatus]:
    return [
        pb.DeliveryStatus(
            queue_channel=d.channel,
            timeline=handed_over(d, r.batching, notification_id) if d.channel == "batching" else timeline(d),
            attempts=d.attempts,
        )
        for d in r.deliveries
    ]


def to_proto(record: store.NotificationRecord) -> pb.Notification:
    """A stored notification as the API shows it."""
    obj = record.object
    answer = pb.Notification(
        notification_id=str(record.notification_id),
        account_id=record.account_id,
        topic=record.topic,
        actor=pb.Actor(user_id=record.actor_user_id, source=record.actor_source),  # type: ignore[arg-type]  # stored enum value
        object=pb.ObjectRef(
            type=obj.get("type", ""),
            id=obj.get("id", ""),
            display_name=obj.get("display_name", ""),
            url=obj.get("url", ""),
            owner_user_id=obj.get("owner_user_id", ""),
        ),
    )
    answer.occurred_at.FromDatetime(record.occurred_at)
    answer.accepted_at.FromDatetime(record.accepted_at)
    for r in record.recipients:
        answer.recipients.append(
            pb.RecipientStatus(
                user_id=r.user_id,
                state=pb.STATE_ACCEPTED if r.state == "accepted" else pb.STATE_SUPPRESSED,
                reason=r.reason,
                channels=[
                    pb.ChannelStatus(
                        channel=_CHANNEL_ENUMS.get(c["c"], common_pb2.CHANNEL_UNSPECIFIED),
                        state=_DECISION_STATES.get(c["s"], pb.STATE_UNSPECIFIED),
                        reason=c["r"],
                    )
                    for c in r.channels
                ],
                deliveries=_deliveries(r, record.notification_id),
                merged_into=str(r.batching.merged_into)
                if r.batching is not None and r.batching.merged_into is not None
                else "",
            )
        )
        if r.read_at is not None:
            answer.recipients[-1].read_at.FromDatetime(r.read_at)
    answer.merged_from.extend(str(i) for i in record.merged_from)
    if record.fanout:
        answer.fanout_state = pb.STATE_FAILED if record.fanout == "failed" else pb.STATE_ACCEPTED
        answer.fanout_reason = record.fanout_error
    return answer


def encode_token(key: tuple[datetime, uuid.UUID]) -> str:
    """An opaque page token for the position after ``key``."""
    return base64.urlsafe_b64encode(f"{key[0].isoformat()}|{key[1]}".encode()).decode()


def decode_token(token: str) -> tuple[datetime, uuid.UUID]:
    """The position a page token names."""
    try:
        at, _, nid = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
        return datetime.fromisoformat(at), uuid.UUID(nid)
    except ValueError as exc:
        raise errors.InvalidArgument("page.page_token is not a token this API issued", field="page.page_token") from exc
