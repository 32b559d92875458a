"""The words of a notification, in the recipient's language (English or French).

Titles are the catalogue's topic label (the same file the preferences
service serves, read once at start) followed by the object's name; the body
names the object and the actor. Producer text stays plain text here: each sender escapes it for its
medium (HTML email, the bell, pop-ups, push payloads).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

_BY = {"en": "by", "fr": "par"}

DEFAULT_CATALOGUE = Path(__file__).resolve().parent.parent / "preferences" / "catalogue.toml"


@dataclass(frozen=True)
class Labels:
    """Topic labels per locale: {topic key: {"en": ..., "fr": ...}}."""

    topics: dict[str, dict[str, str]]

    def title(self, topic: str, locale: str) -> str:
        """The topic's label in ``locale`` (English, then a readable key, as fallbacks)."""
        names = self.topics.get(topic, {})
        return names.get(language(locale)) or names.get("en") or topic.rpartition(".")[2].replace("_", " ").capitalize()


def language(locale: str) -> str:
    """``fr``, ``fr-CA``, ``fr_BE`` → ``fr``; everything else → ``en``."""
    return "fr" if locale.lower().startswith("fr") else "en"


def load_labels(path: Path = DEFAULT_CATALOGUE) -> Labels:
    """Read the topic labels from the catalogue file (an empty set when it is absent)."""
    if not path.is_file():
        return Labels({})
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    topics: dict[str, dict[str, str]] = {}
    for category in data.get("category", []):
        for topic in category.get("topics", []):
            key = f"{category['key']}.{topic['key']}"
            topics[key] = {lang: topic[lang] for lang in ("en", "fr") if lang in topic}
    return Labels(topics)


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
    lang = language(locale)
    if actor_name:
        # ASCII punctuation: a plain-ASCII body stays readable as is in the raw email.
        return f"{object_name}, {_BY[lang]} {actor_name}" if object_name else actor_name
    return object_name
