"""The email's "open it" link (``belfry.openlink``): one read state across channels.

``GET /open?t=<token>``: the token, signed by the email sender, names an
account, a user, a notification and the target URL. A valid one marks that
notification read in the user's bell feed (the same read state the web app
shows; every tab of the user gets the new unread count), then redirects (303)
to the target — only when the target is on the app's own origin or one of
``BELFRY_GATEWAY_LINK_ORIGINS``, the service worker's rule; any other target
redirects to the app itself, so the gateway is never an open redirect. A
forged, damaged or expired token changes nothing: a short page says so and
links to the app. The signed link is the authority; no user token is made.
"""

from __future__ import annotations

import html
from urllib.parse import urlsplit

import asyncpg
from belfry import log
from belfry.errors import BelfryError
from belfry.openlink import PATH, OpenSigner
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from services.gateway import store
from services.gateway.api import traced

_LOG = log.get(__name__)
APP = "/"


def destination(target: str, own_origin: str, link_origins: frozenset[str]) -> str:
    """``target`` when it is on ``own_origin`` (an app path or absolute URL) or one of ``link_origins``, else the app.

    Tabs, line breaks, other control characters and backslashes are refused
    outright: browsers drop or reinterpret them (``/\\host`` is ``//host``).
    """
    if not target or any(c == "\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        return APP
    if target.startswith("/") and not target.startswith("//"):
        return target  # a path of the app itself
    parts = urlsplit(target)
    if parts.scheme not in {"http", "https"} or not parts.hostname or "@" in parts.netloc:
        return APP
    origin = f"{parts.scheme}://{parts.netloc.lower()}"
    return target if origin == own_origin.lower() or origin in link_origins else APP


def _page(title: str, text: str, *, status: int) -> HTMLResponse:
    body = (
        f"<!doctype html><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1>"
        f'<p>{html.escape(text)}</p><p><a href="{APP}">Open the app</a></p>'
    )
    return HTMLResponse(body, status_code=status)


def routes(signer: OpenSigner, pool: asyncpg.Pool, link_origins: frozenset[str]) -> list[Route]:
    """The ``GET /open`` route."""

    async def open_link(request: Request) -> Response:
        try:
            found = signer.verify(request.query_params.get("t", ""))
        except BelfryError as exc:
            return _page("Link not valid", exc.message, status=400)
        try:
            changed = await store.mark_notification_read(pool, found.account_id, found.user_id, found.notification_id)
            if changed:
                await store.read_state_changed(pool, found.account_id, found.user_id)
        except (asyncpg.PostgresError, OSError) as exc:
            # The reader still gets to the object; the item stays unread in the bell until marked there.
            _LOG.warning("open link: could not mark the notification read", error=str(exc))
        own_origin = f"{request.url.scheme}://{request.headers.get('host', '')}"
        return RedirectResponse(destination(found.target, own_origin, link_origins), status_code=303)

    return [Route(PATH, traced(open_link), methods=["GET"])]
