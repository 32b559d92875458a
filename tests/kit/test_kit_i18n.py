"""One rule for the language of a locale, and every language present where words are written."""

from __future__ import annotations

from pathlib import Path

import pytest
from belfry import i18n
from belfry.errors import ConfigError

from services.preferences import catalogue


@pytest.mark.parametrize(
    ("locale", "expected"),
    [
        ("fr", "fr"),
        ("FR", "fr"),
        ("fr-CA", "fr"),
        ("Fr_be", "fr"),
        (" fr ", "fr"),
        ("en-GB", "en"),
        ("de", "en"),
        ("", "en"),
        ("french", "en"),
        ("frr", "en"),
    ],
)
def test_language_is_the_primary_subtag_when_we_write_in_it(locale: str, expected: str) -> None:
    assert i18n.language(locale) == expected


def test_pick_falls_back_to_english_then_nothing() -> None:
    assert i18n.pick({"en": "Deal", "fr": "Transaction"}, "fr-FR") == "Transaction"
    assert i18n.pick({"en": "Deal", "fr": ""}, "fr") == "Deal"
    assert i18n.pick({"en": "Deal"}, "de") == "Deal"
    assert i18n.pick({}, "fr") == ""


def test_every_language_has_catalogue_names_and_email_templates() -> None:
    shipped = catalogue.load()
    for lang in i18n.LANGUAGES:
        assert all(t.names[lang] for t in shipped.topics.values())
        assert all(c.names[lang] for c in shipped.categories)
        folder = Path(catalogue.__file__).parent.parent / "email" / "templates" / lang
        assert {p.name for p in folder.glob("default.*")} == {"default.subject", "default.txt", "default.html"}


def test_a_catalogue_missing_a_language_is_refused_naming_it() -> None:
    text = Path(catalogue.__file__).with_name("catalogue.toml").read_text(encoding="utf-8")
    broken = text.replace(', fr = "Certification mise à jour"', "", 1)
    with pytest.raises(ConfigError, match=r"academy\.certification_updated: no name in 'fr'"):
        catalogue.parse(broken)
