"""The one-click unsubscribe endpoint, mounted by the service that serves the web app.

``routes(signer, switch_off)`` returns Starlette routes for ``/email/unsubscribe``:

* ``GET ?t=<token>`` — a confirmation page with a button (mail scanners
  follow links; they must not unsubscribe anyone);
* ``POST ?t=<token>`` — RFC 8058 one-click (body ``List-Unsubscribe=One-Click``)
  or the page's button: switches the topic off for email for that user.

``preferences_switch_off`` is the production ``switch_off``: it calls the
preferences service's ``SetPreference`` as that user, with a short-lived token
signed by the platform's token keys.
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable

import grpc
from belfry.api.common.v1 import common_pb2
from belfry.api.preferences.v1 import preferences_pb2, preferences_pb2_grpc
from belfry.auth import TokenIssuer
from belfry.errors import BelfryError
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from services.email.unsubscribe import PATH, Signer, Unsubscribe

SwitchOff = Callable[[Unsubscribe], Awaitable[None]]


def _page(title: str, text: str, *, status: int = 200, form_token: str | None = None) -> HTMLResponse:
    button = ""
    if form_token is not None:
        button = (
            f'<form method="post" action="{PATH}?t={html.escape(form_token, quote=True)}">'
            '<button type="submit">Unsubscribe</button></form>'
        )
    body = f"<!doctype html><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>{button}"
    return HTMLResponse(body, status_code=status)


def routes(signer: Signer, switch_off: SwitchOff) -> list[Route]:
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
            await switch_off(found)
        except BelfryError as exc:
            return _page("Could not unsubscribe", exc.message, status=409)
        return _page("Unsubscribed", f"You will no longer receive emails about {found.topic}.")

    return [Route(PATH, confirm, methods=["GET"]), Route(PATH, unsubscribe, methods=["POST"])]


def preferences_switch_off(channel: grpc.aio.Channel, issuer: TokenIssuer) -> SwitchOff:
    """Switch the topic off for email through the preferences service, as the link's user."""
    stub = preferences_pb2_grpc.PreferencesServiceStub(channel)

    async def switch_off(found: Unsubscribe) -> None:
        token = issuer.issue(found.account_id, found.user_id)
        choice = preferences_pb2.Choice(topic=found.topic, channel=common_pb2.CHANNEL_EMAIL, enabled=False)
        await stub.SetPreference(
            preferences_pb2.SetPreferenceRequest(choice=choice), metadata=[("authorization", f"Bearer {token}")]
        )

    return switch_off
