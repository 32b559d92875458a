"""Build one email from a delivery: headers, text and HTML parts, bytes once.

The Message-ID is derived from the delivery id, so a delivery sent again
after a crash or a retry carries the same id and receivers can deduplicate.
"""

from __future__ import annotations

import base64
import dataclasses
import email.utils
import functools
import uuid
from datetime import UTC, datetime
from email.header import Header
from email.headerregistry import Address
from email.utils import formataddr

from belfry.message import Message
from belfry.openlink import OpenSigner
from belfry.unsubscribe import Signer

from services.email import headers
from services.email.branding import Branding, identity
from services.email.dkim_signing import DkimSigner
from services.email.templates import Templates


def message_id(delivery_id: int, account_id: str, domain: str) -> str:
    """``<delivery-N.account@domain>``: stable for a delivery across every attempt."""
    safe_account = "".join(c for c in account_id if c.isalnum() or c in "-_")[:64]
    return f"<delivery-{delivery_id}.{safe_account}@{domain}>"


def feedback_id(topic: str, account_id: str) -> str:
    """``<topic>:<account>:belfry``, Google's ``a:b:c:SenderId`` form: no user, no address (no personal data).

    Complaint loops report spam rates per identifier, so an operator sees which
    account and topic draw complaints. A colon would shift the fields, so each
    keeps only letters, digits and ``.-_``.
    """
    return f"{_feedback_field(topic)}:{_feedback_field(account_id)}:belfry"


def _feedback_field(value: str) -> str:
    return "".join(c for c in value if c.isascii() and (c.isalnum() or c in ".-_"))[:64]


def _safe_url(url: str) -> str:
    # Only web links: a "javascript:" or "data:" URL in an email is an attack, not a link.
    return url if url.startswith(("https://", "http://")) else ""


def _sanitised(message: Message) -> Message:
    items = tuple(dataclasses.replace(i, url=_safe_url(i.url)) for i in message.items)
    return dataclasses.replace(message, url=_safe_url(message.url), items=items)


@dataclasses.dataclass(frozen=True)
class Composer:
    """Everything needed to turn a Message into bytes for SMTP."""

    templates: Templates
    signer: Signer
    sender: Address
    public_url: str
    dkim: DkimSigner | None = None  # signs every finished message (None: sent unsigned)

    @functools.cached_property
    def opener(self) -> OpenSigner:
        """Signs the "open it" links, under the unsubscribe links' keys and time to live."""
        return OpenSigner(self.signer)

    def open_url(self, message: Message) -> str:
        """The "open it" link: the gateway's ``/open``, which marks the notification read and redirects to
        ``message.url`` (empty when the message has no link)."""
        if not message.url:
            return ""
        return self.opener.url(
            self.public_url, message.account_id, message.user_id, message.notification_id, message.url
        )

    def compose(self, delivery_id: int, message: Message, to: Address, branding: Branding | None = None) -> bytes:
        """The full RFC 5322 message (CRLF line ends), headers made safe; ``branding``: the account's (None: defaults)."""
        message = _sanitised(message)
        brand = identity(branding, self.sender)
        unsubscribe = (
            None
            if message.locked
            else self.signer.url(self.public_url, message.account_id, message.user_id, message.topic)
        )
        rendered = self.templates.render(
            message,
            preferences_url=f"{self.public_url}/settings",
            unsubscribe_url=unsubscribe,
            open_url=self.open_url(message),
            brand=brand.look,
        )
        # Built by hand rather than with email.message.EmailMessage: the header
        # registry and generator cost ~2 ms per message, more than everything
        # else together. Every header value here is either ours or made safe by
        # ``headers`` (one line, no control characters), and bodies are base64.
        fields = [
            ("From", formataddr((brand.sender.display_name, brand.sender.addr_spec), charset="utf-8")),
            ("To", formataddr((to.display_name, to.addr_spec), charset="utf-8")),
            *([("Reply-To", brand.reply_to.addr_spec)] if brand.reply_to is not None else []),
            ("Subject", _encoded(headers.header_text(rendered.subject))),
            # RFC 5322 §4.3: "GMT" is obsolete and "-0000" means "zone unknown"; an aware UTC time gives "+0000".
            ("Date", email.utils.format_datetime(datetime.now(UTC))),
            ("Message-ID", message_id(delivery_id, message.account_id, self.sender.domain)),
            ("MIME-Version", "1.0"),
            ("Auto-Submitted", "auto-generated"),  # RFC 3834: no vacation replies
            ("Feedback-ID", feedback_id(message.topic, message.account_id)),
        ]
        if unsubscribe is not None:
            fields.append(("List-Unsubscribe", f"<{unsubscribe}>"))
            fields.append(("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))
        boundary = f"=_belfry_{uuid.uuid4().hex}"
        fields.append(("Content-Type", f'multipart/alternative; boundary="{boundary}"'))
        head = "".join(f"{name}: {value}\r\n" for name, value in fields)
        data = (
            head.encode("ascii")
            + b"\r\n"
            + _part(boundary, "text/plain", rendered.text)
            + _part(boundary, "text/html", rendered.html)
            + f"--{boundary}--\r\n".encode("ascii")
        )
        # Last: a signature covers the message exactly as it goes to SMTP.
        # The From domain's keys sign (DMARC alignment), with the envelope domain's.
        return data if self.dkim is None else self.dkim.sign(data, brand.sender.domain)


def _encoded(text: str) -> str:
    # ASCII stays readable; anything else becomes RFC 2047 encoded words.
    if text.isascii():
        return text
    return Header(text, "utf-8", maxlinelen=998).encode()


def _part(boundary: str, content_type: str, body: str) -> bytes:
    encoded = base64.encodebytes(body.encode("utf-8")).replace(b"\n", b"\r\n")
    return (
        f'--{boundary}\r\nContent-Type: {content_type}; charset="utf-8"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
    ).encode("ascii") + encoded
