"""The topic catalogue, read once from ``catalogue.toml`` and checked on load.

The file is the single source of truth for which notification types exist,
which channels each may use, its product defaults, lock, visibility and time
to live. A broken file stops the service at start-up with every problem named.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from belfry import i18n
from belfry.channels import NAMES as CHANNELS
from belfry.errors import ConfigError, InvalidArgument, NotFound

BATCHING_KINDS = frozenset({"", "assignment", "digest"})
_PATH = Path(__file__).with_name("catalogue.toml")


@dataclass(frozen=True)
class Category:
    """A group of topics on the settings page."""

    key: str
    names: dict[str, str]  # per language (belfry.i18n)

    def name(self, locale: str) -> str:
        """The display name in the locale's language."""
        return i18n.pick(self.names, locale)


@dataclass(frozen=True)
class Topic:
    """One notification type."""

    key: str
    category: str
    names: dict[str, str]  # per language (belfry.i18n)
    channels: tuple[str, ...]  # allowed channels, in settings-page order
    defaults: frozenset[str]  # product default: channels on
    locked: bool
    visible_to: str  # "everyone", "super_admin" or "tool:<name>"
    ttl_seconds: int
    batching: str
    sound: str  # product sound for pop-ups, "" = the user's default

    def name(self, locale: str) -> str:
        """The display name in the locale's language."""
        return i18n.pick(self.names, locale)

    def visible(self, *, super_admin: bool, tool_access: frozenset[str]) -> bool:
        """Whether a user with these directory facts may see (and receive) this topic."""
        if self.visible_to == "everyone":
            return True
        if self.visible_to == "super_admin":
            return super_admin
        return self.visible_to.removeprefix("tool:") in tool_access


@dataclass(frozen=True)
class Catalogue:
    """Every category and topic, plus the pop-up sounds."""

    categories: tuple[Category, ...]
    topics: dict[str, Topic]
    sounds: tuple[str, ...]
    default_sound: str

    def topic(self, key: str, *, field: str = "topic") -> Topic:
        """The topic named ``key``; NotFound names the bad key."""
        found = self.topics.get(key)
        if found is None:
            raise NotFound(f"unknown topic {key!r}; ListTopics names every topic", field=field)
        return found

    def check_sound(self, sound: str, *, field: str) -> str:
        """``sound`` if it is one of the six named sounds."""
        if sound not in self.sounds:
            raise InvalidArgument(f"unknown sound {sound!r}; choose one of {', '.join(self.sounds)}", field=field)
        return sound


def _topic(category: dict[str, Any], raw: dict[str, Any], product: dict[str, Any], problems: list[str]) -> Topic:
    def pick(name: str) -> Any:
        return raw.get(name, category.get(name, product.get(name)))

    key = f"{category['key']}.{raw['key']}"
    channels = tuple(pick("channels") or CHANNELS)  # every channel unless the file narrows it
    defaults = frozenset(pick("defaults"))
    for channel in channels:
        if channel not in CHANNELS:
            problems.append(f"{key}: unknown channel {channel!r}")
    if not defaults <= set(channels):
        problems.append(f"{key}: product defaults {sorted(defaults - set(channels))} are not allowed channels")
    batching = str(pick("batching") or "")
    if batching not in BATCHING_KINDS:
        problems.append(f"{key}: batching must be one of {sorted(BATCHING_KINDS)}")
    visible_to = str(pick("visible_to"))
    if visible_to not in {"everyone", "super_admin"} and not visible_to.startswith("tool:"):
        problems.append(f"{key}: visible_to must be everyone, super_admin or tool:<name>")
    sound = str(pick("sound") or "")
    if sound and sound not in product["sounds"]:
        problems.append(f"{key}: unknown sound {sound!r}")
    return Topic(
        key=key,
        category=category["key"],
        names=_names(raw, key, problems),
        channels=tuple(c for c in CHANNELS if c in channels),
        defaults=defaults,
        locked=bool(pick("locked") or False),
        visible_to=visible_to,
        ttl_seconds=int(pick("ttl")),
        batching=batching,
        sound=sound,
    )


def _names(raw: dict[str, Any], key: str, problems: list[str]) -> dict[str, str]:
    """The entry's name in every language we write in (a missing one is a problem)."""
    problems.extend(f"{key}: no name in {lang!r}" for lang in i18n.LANGUAGES if not raw.get(lang))
    return {lang: str(raw.get(lang, "")) for lang in i18n.LANGUAGES}


def parse(text: str) -> Catalogue:
    """Parse and check a catalogue; ConfigError lists every problem."""
    data = tomllib.loads(text)
    product = data["product"]
    problems: list[str] = []
    categories: list[Category] = []
    topics: dict[str, Topic] = {}
    for category in data["category"]:
        categories.append(Category(category["key"], _names(category, category["key"], problems)))
        for raw in category["topics"]:
            topic = _topic(category, raw, product, problems)
            if topic.key in topics:
                problems.append(f"{topic.key}: defined twice")
            topics[topic.key] = topic
    sounds = tuple(product["sounds"])
    if len(sounds) != 6 or product["default_sound"] not in sounds:
        problems.append("the product names six sounds, one of them the default")
    if problems:
        raise ConfigError("invalid topic catalogue:\n  - " + "\n  - ".join(problems))
    return Catalogue(tuple(categories), topics, sounds, product["default_sound"])


def load(path: Path = _PATH) -> Catalogue:
    """The catalogue shipped with the service."""
    return parse(path.read_text(encoding="utf-8"))
