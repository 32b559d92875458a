"""The one-click unsubscribe endpoint of the email sender's links (``belfry.unsubscribe``).

* ``GET ?t=<token>`` — a confirmation page with a button (mail scanners
  follow links; they must not unsubscribe anyone);
* ``POST ?t=<token>`` — RFC 8058 one-click (body ``List-Unsubscribe=One-Click``)
  or the page's button: the preferences service's internal ``Unsubscribe``
  RPC switches the topic off for email for that user (audited as
  ``email-link``). The signed link is the authority; no user token is made.

The page looks like the web app (its stylesheet) and speaks its words
(``static/lang/<language>.json``, the ``unsubscribe.*`` keys) in the user's
language (their profile's, which the preferences service answers with the
topic's label), else in the browser's (``Accept-Language``), else English.
"""

from __future__ import annotations

import html
import json
from functools import cache
from pathlib import Path

from belfry.errors import BelfryError, FailedPrecondition, Unavailable
from belfry.preferences import Preferences, UnsubscribeTopic
from belfry.unsubscribe import PATH, Signer
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

STATIC = Path(__file__).resolve().parent / "static"


@cache
def _texts(language: str) -> dict[str, str]:
    """The web app's words in ``language`` (English where the file lacks one)."""
    english: dict[str, str] = json.loads((STATIC / "lang" / "en.json").read_text())
    found = STATIC / "lang" / f"{language}.json"
    if language == "en" or not found.is_file():
        return english
    own: dict[str, str] = json.loads(found.read_text())
    return english | own


def _browser_language(request: Request) -> str:
    """The first language of ``Accept-Language`` the app has a file for, else English."""
    for part in request.headers.get("accept-language", "").split(","):
        primary = part.split(";")[0].strip().replace("_", "-").split("-")[0].lower()
        if primary.isalpha() and (STATIC / "lang" / f"{primary}.json").is_file():
            return primary
    return "en"


def _page(
    language: str, title_key: str, text_key: str, *, topic: str = "", status: int = 200, form_token: str | None = None
) -> HTMLResponse:
    words = _texts(language)
    title = html.escape(words[title_key])
    text = html.escape(words[text_key].replace("{topic}", topic))
    button = ""
    if form_token is not None:
        button = (
            f'<form method="post" action="{PATH}?t={html.escape(form_token, quote=True)}">'
            f'<button type="submit" class="danger">{html.escape(words["unsubscribe.button"])}</button></form>'
        )
    body = (
        f'<!doctype html><html lang="{html.escape(language, quote=True)}" data-ready="yes"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{title} · Belfry</title><link rel="icon" href="/static/favicon.svg">'
        '<link rel="stylesheet" href="/static/app.css"></head><body>'
        '<header><a class="brand" href="/">Belfry</a></header>'
        f'<main><div class="card"><h1>{title}</h1><p id="message">{text}</p>{button}'
        f'<p><a href="/settings">{html.escape(words["nav.settings"])}</a></p></div></main></body></html>'
    )
    return HTMLResponse(body, status_code=status)


def routes(signer: Signer, preferences: Preferences) -> list[Route]:
    """The GET (confirm) and POST (one-click) routes."""

    async def describe(request: Request) -> tuple[UnsubscribeTopic | None, HTMLResponse | None]:
        """The link's topic, or the page that says why there is none."""
        try:
            found = signer.verify(request.query_params.get("t", ""))
        except BelfryError:
            return None, _page(
                _browser_language(request), "unsubscribe.invalidTitle", "unsubscribe.invalid", status=400
            )
        try:
            topic = await preferences.unsubscribe(found.account_id, found.user_id, found.topic, preview=True)
        except BelfryError as exc:
            status = 503 if isinstance(exc, Unavailable) else 409
            return None, _page(
                _browser_language(request), "unsubscribe.failedTitle", "unsubscribe.failed", status=status
            )
        if topic.locked:
            page = _page(topic.language, "unsubscribe.lockedTitle", "unsubscribe.locked", topic=topic.label, status=409)
            return None, page
        return topic, None

    async def confirm(request: Request) -> HTMLResponse:
        topic, refusal = await describe(request)
        if topic is None:
            assert refusal is not None
            return refusal
        token = request.query_params.get("t", "")
        return _page(topic.language, "unsubscribe.title", "unsubscribe.ask", topic=topic.label, form_token=token)

    async def unsubscribe(request: Request) -> HTMLResponse:
        topic, refusal = await describe(request)
        if topic is None:
            assert refusal is not None
            return refusal
        found = signer.verify(request.query_params.get("t", ""))
        try:
            await preferences.unsubscribe(found.account_id, found.user_id, found.topic)
        except FailedPrecondition:
            return _page(topic.language, "unsubscribe.lockedTitle", "unsubscribe.locked", topic=topic.label, status=409)
        except BelfryError as exc:
            status = 503 if isinstance(exc, Unavailable) else 409
            return _page(topic.language, "unsubscribe.failedTitle", "unsubscribe.failed", status=status)
        return _page(topic.language, "unsubscribe.doneTitle", "unsubscribe.done", topic=topic.label)

    return [Route(PATH, confirm, methods=["GET"]), Route(PATH, unsubscribe, methods=["POST"])]
