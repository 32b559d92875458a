"""Recipient rules of the specification, each a small pure function.

The rules decide *who* is concerned by an event before preferences decide
*how*: every candidate either passes or is suppressed with a reason, and
the reason is recorded (no decision is silently lost). Rules that need
stored facts (inbox visits, team members, earlier mentions) take them as
arguments; the caller looks them up.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from services.dispatcher.model import Event

QUOTES = "quotes"
CONVERSATIONS = "conversations"
WEBSITE_VISITS = "website_visits"
TASKS = "tasks"
WORKFLOWS = "workflows"

# Suppression reasons, as the status API reports them.
SELF_ACTION = "self_action"
API_CREATED = "api_created"
NOT_FIRST_MENTION = "not_first_mention"
NOT_QUOTE_OWNER = "not_quote_owner"
INBOX_NOT_VISITED = "inbox_not_visited"
NOT_PRIMARY_MEMBER = "not_primary_team_member"
# Named by the event, but not an active member of the account (recorded at fan-out, nobody refused).
NOT_A_MEMBER = "not_an_active_member"
# The recipient muted the record or thread (locked topics still reach them).
MUTED = "muted_by_recipient"


@dataclass(frozen=True)
class Verdict:
    """One candidate after the rules: ``reason`` empty means they are told."""

    user_id: str
    reason: str = ""
    mention_only: bool = False  # there only because of an @mention: the first-mention rule applies


def category_of(topic: str) -> str:
    """The category part of a catalogue key ("contacts.contact_assigned" → "contacts")."""
    return topic.partition(".")[0]


def is_mention_topic(topic: str) -> bool:
    """Topics that report an @mention (``contacts.mentioned``, ``blog.draft_mentioned``...)."""
    return topic.endswith("mentioned")


def _unique(ids: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for user_id in ids:
        if user_id:
            seen.setdefault(user_id, None)
    return list(seen)


def owners(event: Event) -> list[str]:
    """The users in the object's owner property (the object's owner first)."""
    return _unique([event.object.owner_user_id, *event.owner_user_ids])


def candidates(event: Event) -> list[str]:
    """Everyone the event names: explicit, owner property, custom user properties, mentions."""
    return _unique(
        [*event.recipient_user_ids, *owners(event), *event.custom_property_user_ids, *event.mentioned_user_ids]
    )


def mention_only(event: Event, user_id: str) -> bool:
    """True when ``user_id`` is named only as a mention (not as recipient or owner)."""
    if user_id not in event.mentioned_user_ids:
        return False  # the common case: no need to gather everyone else
    others = {*event.recipient_user_ids, *owners(event), *event.custom_property_user_ids}
    return user_id not in others


def is_self_action(event: Event, user_id: str) -> bool:
    """Nobody is told about their own action (self-assignment, self-mention...)."""
    return bool(event.actor_user_id) and event.actor_user_id == user_id


def is_api_created(event: Event) -> bool:
    """Tasks and activities (notes, comments with mentions) created via the API never notify."""
    if event.source != "api":
        return False
    return category_of(event.topic) == TASKS or bool(event.activity_id) or is_mention_topic(event.topic)


def quote_allows(event: Event, user_id: str) -> bool:
    """Quotes notify only the quote's owner."""
    return category_of(event.topic) != QUOTES or user_id in owners(event)


def conversation_allows(event: Event, user_id: str, visited: Collection[str]) -> bool:
    """Conversations notify a user only once they have visited the conversations inbox."""
    return category_of(event.topic) != CONVERSATIONS or user_id in visited


def is_unassigned_team_conversation(event: Event) -> bool:
    """An unassigned conversation of a team inbox: only the team's primary members are told."""
    return category_of(event.topic) == CONVERSATIONS and event.unassigned and bool(event.team_id)


def email_only(topic: str) -> bool:
    """Website visits are email-only."""
    return category_of(topic) == WEBSITE_VISITS


def feeds_digest(topic: str, batching: str) -> bool:
    """Task and workflow events are facts for the weekly task and Friday workflow digests."""
    return batching != "digest" and category_of(topic) in {TASKS, WORKFLOWS}


def decide(event: Event, *, visited: Collection[str], team_primary: Sequence[str] | None) -> list[Verdict]:
    """Apply every rule to every candidate, in the order the product documents them.

    ``team_primary`` is the team's primary members when the event is an
    unassigned team-inbox conversation (they replace the named candidates).
    The first-mention rule is applied later, atomically with the write.
    """
    names = candidates(event)
    if team_primary is not None and is_unassigned_team_conversation(event):
        names = _unique([*team_primary, *names])
    primary = set(team_primary or ())
    api_created = is_api_created(event)
    verdicts: list[Verdict] = []
    for user_id in names:
        if api_created:
            reason = API_CREATED
        elif is_self_action(event, user_id):
            reason = SELF_ACTION
        elif team_primary is not None and is_unassigned_team_conversation(event) and user_id not in primary:
            reason = NOT_PRIMARY_MEMBER
        elif not quote_allows(event, user_id):
            reason = NOT_QUOTE_OWNER
        elif not conversation_allows(event, user_id, visited):
            reason = INBOX_NOT_VISITED
        else:
            reason = ""
        verdicts.append(Verdict(user_id, reason, bool(event.activity_id) and mention_only(event, user_id)))
    return verdicts


def first_mentions(verdicts: Sequence[Verdict], first: Collection[str]) -> list[Verdict]:
    """Suppress mention-only candidates whose mention in this activity is not the first."""
    return [
        Verdict(v.user_id, NOT_FIRST_MENTION, v.mention_only)
        if v.mention_only and not v.reason and v.user_id not in first
        else v
        for v in verdicts
    ]
