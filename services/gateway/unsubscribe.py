"""The one-click unsubscribe endpoint of the email sender's links (``belfry.unsubscribe``).

* ``GET ?t=<token>`` — a confirmation page with a button (mail scanners
  follow links; they must not unsubscribe anyone);
* ``POST ?t=<token>`` — RFC 8058 one-click (body ``List-Unsubscribe=One-Click``)
  or the page's button: the preferences service's internal ``Unsubscribe``
  RPC switches the topic off for email for that user (audited as
  ``email-link``). The signed link is the authority; no user token is made.
"""

from __future__ import annotations

import html

from belfry.errors import BelfryError, Unavailable
from belfry.preferences import Preferences
from belfry.unsubscribe import PATH, Signer
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route


def _page(title: str, text: str, *, status: int = 200, form_token: str | None = None) -> HTMLResponse:
    button = ""
    if form_token is not None:
        button = (
            f'<form method="post" action="{PATH}?t={html.escape(form_token, quote=True)}">'
            '<button type="submit">Unsubscribe</button></form>'
        )
    body = f"<!doctype html><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>{button}"
    return HTMLResponse(body, status_code=status)


def routes(signer: Signer, preferences: Preferences) -> list[Route]:
    """The GET (confirm) and POST (one-click) routes."""

    async def confirm(request: Request) -> HTMLResponse:
        token = request.query_params.get("t", "")
        try:
            found = signer.verify(token)
        except BelfryError as exc:
            return _page("Link not valid", exc.message, status=400)
        return _page("Unsubscribe", f"Stop emails about {found.topic}?", form_token=token)

    async def unsubscribe(request: Request) -> HTMLResponse:
        try:
            found = signer.verify(request.query_params.get("t", ""))
        except BelfryError as exc:
            return _page("Link not valid", exc.message, status=400)
        try:
            await preferences.unsubscribe(found.account_id, found.user_id, found.topic)
        except BelfryError as exc:
            return _page("Could not unsubscribe", exc.message, status=503 if isinstance(exc, Unavailable) else 409)
        return _page("Unsubscribed", f"You will no longer receive emails about {found.topic}.")

    return [Route(PATH, confirm, methods=["GET"]), Route(PATH, unsubscribe, methods=["POST"])]
