"""The words of a notification, in the recipient's language (``belfry.i18n``).

Titles are the topic's label (from the preferences service's answer, which
the dispatcher asks for anyway) followed by the object's name; the body
names the object and the actor. Producer text stays plain text here: each sender escapes it for its
medium (HTML email, the bell, pop-ups, push payloads).
"""

from __future__ import annotations

from belfry import i18n

_BY = {"en": "by", "fr": "par"}
_TITLE_OBJECT_CHARS = 80


def title(label: str, object_name: str) -> str:
    """The topic label, then the object it is about, so a subject or toast says what happened to what.

    The object's name is untrusted producer text: kept as text, and shortened
    (the body carries it whole) so a long name cannot crowd the label out.
    """
    name = " ".join(object_name.split())
    if not name:
        return label
    if len(name) > _TITLE_OBJECT_CHARS:
        name = name[: _TITLE_OBJECT_CHARS - 1].rstrip() + "\u2026"
    return f"{label}: {name}"


def body(object_name: str, actor_name: str, locale: str) -> str:
    """One line naming the object and who acted (untrusted text, kept as text)."""
    if actor_name:
        # ASCII punctuation: a plain-ASCII body stays readable as is in the raw email.
        return f"{object_name}, {i18n.pick(_BY, locale)} {actor_name}" if object_name else actor_name
    return object_name
