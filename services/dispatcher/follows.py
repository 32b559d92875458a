"""Following records and threads: who follows automatically, and which settings say so.

Automatic follows (recorded by fan-out, in the same transaction as the
notification's deliveries) come from the event itself:

* ``owner``: the object's owner and the users in its owner property;
* ``comment``: the actor of an activity (a comment, a reply: the event has an ``activity_id``);
* ``mention``: the users mentioned;
* ``assigned``: the recipients of an assignment topic.

``BELFRY_DISPATCHER_AUTO_FOLLOW`` chooses them per object type:
``*=owner,comment,mention,assigned;ticket=owner,assigned`` (``*`` is every
type not listed; an empty value after ``=`` switches them off). An explicit
choice (follow, unfollow, mute) always wins over an automatic follow.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.dispatcher.model import Event

SOURCES = ("owner", "comment", "mention", "assigned")
DEFAULT = "*=" + ",".join(SOURCES)


@dataclass(frozen=True)
class AutoFollow:
    """Which automatic follows apply to each object type."""

    rules: dict[str, frozenset[str]]

    def sources(self, object_type: str) -> frozenset[str]:
        """The automatic follows for ``object_type``."""
        return self.rules.get(object_type, self.rules.get("*", frozenset()))


def parse(text: str) -> AutoFollow:
    """``type=source,source;type=...`` → rules; ValueError naming what is wrong."""
    rules: dict[str, frozenset[str]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        kind, sep, listed = part.partition("=")
        sources = frozenset(filter(None, (s.strip() for s in listed.split(","))))
        unknown = sources - set(SOURCES)
        if not sep or not kind.strip() or unknown:
            raise ValueError(
                f"{part!r} is not type=source,...; sources are {', '.join(SOURCES)}"
                + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else "")
            )
        rules[kind.strip()] = sources
    return AutoFollow(rules)


def automatic(event: Event, *, assignment: bool, rules: AutoFollow) -> list[tuple[str, str]]:
    """(user, source) pairs the event makes follow its object (none when it names no object)."""
    obj = event.object
    if not obj.type or not obj.id:
        return []
    allowed = rules.sources(obj.type)
    found: list[tuple[str, str]] = []
    if "owner" in allowed:
        found += [(u, "owner") for u in (obj.owner_user_id, *event.owner_user_ids) if u]
    if "comment" in allowed and event.activity_id and event.actor_user_id:
        found.append((event.actor_user_id, "comment"))
    if "mention" in allowed:
        found += [(u, "mention") for u in event.mentioned_user_ids]
    if "assigned" in allowed and assignment:
        found += [(u, "assigned") for u in event.recipient_user_ids]
    first: dict[str, str] = {}
    for user_id, source in found:
        first.setdefault(user_id, source)
    return list(first.items())
