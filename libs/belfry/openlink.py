"""Signed, expiring "open it" links of emails and web pushes: one read state across channels.

An email's "open it" link does not point at the object itself but at the
gateway, ``GET /open?t=<token>``. The token names (account, user,
notification id, target URL) and an expiry; the email sender signs it, the
gateway verifies it, marks that notification read in the user's bell feed and
redirects (303) to the target when the target is the app's own origin or one
of ``BELFRY_GATEWAY_LINK_ORIGINS`` (else to the app).

A web push carries the same link, relative to the app (the service worker
opens it on the app's origin, which is the gateway's), so opening the push
marks the notification read as opening the email does.

The key machinery is the unsubscribe links' (``belfry.unsubscribe``): the
same ``BELFRY_UNSUBSCRIBE_KEY``, ``BELFRY_UNSUBSCRIBE_OTHER_KEYS`` and
``BELFRY_UNSUBSCRIBE_TTL_SECONDS``, so the same three-step rotation covers
both kinds of link. The MAC covers a purpose prefix (``open.``) that
unsubscribe tokens do not have, so a token of one kind is never accepted as
the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from belfry.config import Env
from belfry.errors import InvalidArgument
from belfry.unsubscribe import Links

PATH = "/open"
_PURPOSE = b"open."


@dataclass(frozen=True)
class OpenLink:
    """What a valid link names."""

    account_id: str
    user_id: str
    notification_id: str
    target: str
    expires_at: int


class OpenSigner:
    """Open links under the unsubscribe links' keys (``belfry.unsubscribe.Links`` with the ``open.`` purpose)."""

    def __init__(self, links: Links) -> None:
        self._links = links.sharing(_PURPOSE)

    def token(self, account_id: str, user_id: str, notification_id: str, target: str) -> str:
        """A token valid for the configured time to live."""
        return self._links.sign({"a": account_id, "u": user_id, "n": notification_id, "l": target})

    def url(self, base_url: str, account_id: str, user_id: str, notification_id: str, target: str) -> str:
        """The email's "open it" link: the gateway's ``/open`` under ``base_url``."""
        return f"{base_url}{PATH}?t={quote(self.token(account_id, user_id, notification_id, target))}"

    def verify(self, token: str) -> OpenLink:
        """What a token names; InvalidArgument when forged, damaged or expired."""
        invalid = "this link is not valid"
        claims = self._links.open(
            token, invalid=invalid, expired="this link has expired; open the notification from the app instead"
        )
        try:
            return OpenLink(str(claims["a"]), str(claims["u"]), str(claims["n"]), str(claims["l"]), int(claims["e"]))
        except KeyError as exc:
            raise InvalidArgument(invalid, field="t") from exc


def signer_from(env: Env, *, required: bool) -> OpenSigner | None:
    """The signer of a service that makes open links, from ``BELFRY_UNSUBSCRIBE_KEY`` and its time to live.

    ``required`` False: an unset key means no open links (None); a key shorter than 32 characters is
    a problem either way.
    """
    key = env.str("BELFRY_UNSUBSCRIBE_KEY", "")
    ttl = env.int("BELFRY_UNSUBSCRIBE_TTL_SECONDS", 60 * 86400, minimum=3600)
    if not key and not required:
        return None
    if len(key) < 32:
        env.problem(
            "BELFRY_UNSUBSCRIBE_KEY must be set to a secret of at least 32 characters (it signs unsubscribe and "
            "open links)"
        )
        return None
    return OpenSigner(Links(key.encode(), ttl_seconds=ttl))
