"""Email templates per topic and locale (Jinja2; HTML escaped automatically).

``templates/<locale>/<topic>.{subject,txt,html}`` override the locale's
``default.*`` files for one topic. Locales we have no text for fall back to
English. Autoescape is on for ``.html`` only: the text part and the subject
are plain text (the subject is then made header-safe by ``headers``).
Every template gets ``brand`` (``services.email.branding.Look``): the
account's logo URL and its alt text, accent colour (``#rrggbb`` only) and
footer text. ``open_url`` is the "open it" link: the gateway's signed ``/open``
link (``belfry.openlink``), which marks the notification read in the bell
feed before redirecting to the object; empty when the message has no URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from belfry import i18n
from belfry.message import Message

from services.email.branding import DEFAULT_ACCENT, Look

_ROOT = Path(__file__).resolve().parent / "templates"
DEFAULT_LOOK = Look(name="", logo_url="", accent=DEFAULT_ACCENT, footer="")


@dataclass(frozen=True)
class Rendered:
    """The three parts of one email."""

    subject: str
    text: str
    html: str


class Templates:
    """Loads templates once; ``render`` picks the topic's own or the locale's default."""

    def __init__(self, root: Path = _ROOT) -> None:
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(root),
            autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=False),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._cache: dict[tuple[str, str, str], jinja2.Template] = {}

    def _template(self, locale: str, topic: str, part: str) -> jinja2.Template:
        key = (locale, topic, part)
        found = self._cache.get(key)
        if found is None:
            found = self._env.select_template([f"{locale}/{topic}.{part}", f"{locale}/default.{part}"])
            self._cache[key] = found
        return found

    def render(
        self,
        message: Message,
        *,
        preferences_url: str,
        unsubscribe_url: str | None,
        open_url: str | None = None,
        brand: Look = DEFAULT_LOOK,
    ) -> Rendered:
        """Subject, text and HTML for ``message`` in the recipient's language, with the account's ``brand``."""
        locale = i18n.language(message.locale)
        context: dict[str, Any] = {
            "m": message,
            "items": message.items,
            "count": message.merged_count,
            "preferences_url": preferences_url,
            "unsubscribe_url": unsubscribe_url,
            "open_url": message.url if open_url is None else open_url,
            "brand": brand,
        }
        return Rendered(
            subject=self._template(locale, message.topic, "subject").render(context),
            text=self._template(locale, message.topic, "txt").render(context),
            html=self._template(locale, message.topic, "html").render(context),
        )
