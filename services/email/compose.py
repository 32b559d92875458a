"""Build one email from a delivery: headers, text and HTML parts, bytes once.

The Message-ID is derived from the delivery id, so a delivery sent again
after a crash or a retry carries the same id and receivers can deduplicate.
"""

from __future__ import annotations

import dataclasses
import email.policy
import email.utils
from email.headerregistry import Address
from email.message import EmailMessage

from belfry.message import Message

from services.email import headers
from services.email.templates import Templates
from services.email.unsubscribe import Signer

_POLICY = email.policy.SMTP.clone(max_line_length=998)


def message_id(delivery_id: int, account_id: str, domain: str) -> str:
    """``<delivery-N.account@domain>``: stable for a delivery across every attempt."""
    safe_account = "".join(c for c in account_id if c.isalnum() or c in "-_")[:64]
    return f"<delivery-{delivery_id}.{safe_account}@{domain}>"


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

    def compose(self, delivery_id: int, message: Message, to: Address) -> bytes:
        """The full RFC 5322 message (CRLF line ends), headers made safe."""
        message = _sanitised(message)
        unsubscribe = (
            None
            if message.locked
            else self.signer.url(self.public_url, message.account_id, message.user_id, message.topic)
        )
        rendered = self.templates.render(
            message, preferences_url=f"{self.public_url}/settings/notifications", unsubscribe_url=unsubscribe
        )
        mail = EmailMessage(policy=_POLICY)
        mail["Subject"] = headers.header_text(rendered.subject)
        mail["From"] = self.sender
        mail["To"] = to
        mail["Date"] = email.utils.formatdate(usegmt=True)
        mail["Message-ID"] = message_id(delivery_id, message.account_id, self.sender.domain)
        mail["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies
        if unsubscribe is not None:
            mail["List-Unsubscribe"] = f"<{unsubscribe}>"
            mail["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        mail.set_content(rendered.text)
        mail.add_alternative(rendered.html, subtype="html")
        return mail.as_bytes()
