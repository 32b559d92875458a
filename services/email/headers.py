"""Untrusted text made safe for mail headers.

Producer text (titles, names) and directory data (addresses) reach headers.
A CR or LF would start a new header (``Bcc:``) or end the headers early; an
RFC 2047 encoded word can hide one (``=?utf-8?q?x=0D=0ABcc:...?=``) and be
decoded by a parser downstream; NUL breaks some MTAs. So: decode encoded
words first (to see what they hide), replace every control character and
Unicode line separator with a space, and break any remaining ``=?`` so
nothing is decoded twice. Addresses are not repaired: one that is not a
plain ``local@domain`` is refused.
"""

from __future__ import annotations

import contextlib
import re
from email.header import decode_header, make_header
from email.headerregistry import Address

_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")
# Dot-atom local part and a dotted domain: no quotes, spaces, commas, angle
# brackets or comments, so a single address can never become several.
_ADDRESS = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+$"
)


def header_text(value: str, *, limit: int = 250) -> str:
    """One line of plain text, safe for a Subject or a display name."""
    if "=?" in value:
        # Invalid encoded words are left as the literal text they are.
        with contextlib.suppress(ValueError, LookupError, UnicodeDecodeError):
            value = str(make_header(decode_header(value)))
    value = _CONTROL.sub(" ", value)
    while "=?" in value:
        value = value.replace("=?", "= ?")
    value = " ".join(value.split())
    return value[:limit]


def recipient(address: str, display_name: str = "") -> Address | None:
    """The ``To`` address, or None when the address is not one plain mailbox."""
    if len(address) > 254 or not _ADDRESS.match(address):
        return None
    local, _, domain = address.rpartition("@")
    return Address(display_name=header_text(display_name, limit=100), username=local, domain=domain)
