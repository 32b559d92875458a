"""The languages Belfry writes in, and which one a user's locale gets.

Every place that writes words for a person (topic labels, titles and bodies,
merged titles, digests, email templates, the settings page) asks
``language(locale)``, so one rule decides, whatever the case or separator of
the directory's locale (``fr``, ``fr-CA``, ``FR_be``), and one fallback
applies: English. Adding a language is the recipe in ``docs/architecture.md``.
"""

from __future__ import annotations

from collections.abc import Mapping

LANGUAGES: tuple[str, ...] = ("en", "fr")
DEFAULT = "en"


def language(locale: str) -> str:
    """The language for ``locale``: its primary subtag when we write in it, else ``DEFAULT``."""
    primary = locale.strip().replace("_", "-").partition("-")[0].lower()
    return primary if primary in LANGUAGES else DEFAULT


def pick(texts: Mapping[str, str], locale: str) -> str:
    """The text in the locale's language, else in the ``DEFAULT`` language, else ""."""
    return texts.get(language(locale)) or texts.get(DEFAULT, "")
