"""The merged notification of a closed window: "3 contacts were assigned to you".

Pure functions over ``belfry.message.Message``: the window's items in, one
message out. Names are untrusted producer text and stay as data (senders
escape them for their medium).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace

from belfry import i18n
from belfry.message import Item, Message

# uuid5 namespace of merged notifications and digests: a retried close or
# digest produces the same notification id, and the queue ignores duplicates.
NAMESPACE = uuid.UUID("6f0b7a52-5c1e-4d59-9d2b-2f3f6b1a9c40")

# English plural, French plural and the French agreement ("attribués"/"attribuées").
_NOUNS: dict[str, tuple[str, str, str]] = {
    "contact": ("contacts", "contacts", "s"),
    "company": ("companies", "entreprises", "es"),
    "deal": ("deals", "transactions", "es"),
    "ticket": ("tickets", "tickets", "s"),
    "task": ("tasks", "tâches", "es"),
    "lead": ("leads", "leads", "s"),
    "conversation": ("conversations", "conversations", "s"),
    "record": ("records", "fiches", "es"),
}
_NAMED = 10  # names listed in the body before "and N more"


def merged_id(account_id: str, window_id: uuid.UUID) -> uuid.UUID:
    """The notification id of a window's merged notification."""
    return uuid.uuid5(NAMESPACE, f"window/{account_id}/{window_id}")


def item_of(message: Message, object_type: str, object_id: str) -> Item:
    """The item a single-assignment message stands for."""
    for item in message.items:
        if item.id == object_id:
            return item
    name = str(message.variables.get("display_name") or message.variables.get("object_name") or message.title)
    return Item(type=object_type, id=object_id, display_name=name, url=message.url)


def title(object_type: str, count: int, locale: str) -> str:
    """``3 contacts were assigned to you`` / ``3 contacts vous ont été attribués``."""
    en, fr, agreement = _NOUNS.get(object_type, (f"{object_type} records", f"fiches {object_type}", "es"))
    if i18n.language(locale) == "fr":
        return f"{count} {fr} vous ont été attribué{agreement}"
    return f"{count} {en} were assigned to you"


def body(items: Sequence[Item], locale: str) -> str:
    """The names, listed: ``Acme, Beta and Gamma`` (``… and 4 more`` past ten)."""
    french = i18n.language(locale) == "fr"
    names = [i.display_name for i in items[:_NAMED]]
    rest = len(items) - len(names)
    if rest:
        names.append(f"{rest} autres" if french else f"{rest} more")
    if len(names) == 1:
        return names[0]
    joiner = " et " if french else " and "
    return ", ".join(names[:-1]) + joiner + names[-1]


def common_parent(urls: Sequence[str], fallback: str) -> str:
    """The longest common parent path of ``urls`` (``…/contacts/`` for two contact pages)."""
    urls = [u for u in urls if u]
    if not urls:
        return fallback
    prefix = urls[0]
    for url in urls[1:]:
        while not url.startswith(prefix):
            prefix = prefix[:-1]
    cut = prefix.rfind("/")
    return prefix[: cut + 1] if cut > len("https://") else urls[0]


def list_url(items: Sequence[Item], latest: Message) -> str:
    """The link to the list: the producer's ``list_url`` variable, else the items' common parent path."""
    given = latest.variables.get("list_url")
    if isinstance(given, str) and given:
        return given
    return common_parent([i.url for i in items], latest.url)


def merged(account_id: str, window_id: uuid.UUID, object_type: str, messages: Sequence[tuple[str, Message]]) -> Message:
    """One message for a window's ``(object_id, message)`` pairs, oldest first.

    A window holding a single assignment sends that assignment's own message
    unchanged: merging one item would only lose its wording.
    """
    if len(messages) == 1:
        return messages[0][1]
    latest = messages[-1][1]
    items = tuple(item_of(m, object_type, oid) for oid, m in messages)
    locale = latest.locale
    return replace(
        latest,
        notification_id=str(merged_id(account_id, window_id)),
        title=title(object_type, len(items), locale),
        body=body(items, locale),
        url=list_url(items, latest),
        actor_user_id="",
        items=items,
        variables={**latest.variables, "merged_count": len(items), "object_type": object_type},
    )
