"""The JSON the service worker receives, kept within the 4 KB web push limit."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from belfry.message import Message

# RFC 8291 aes128gcm adds 86 bytes of header, a 16-byte tag and a delimiter
# byte to one record; push services accept 4096 bytes of body.
MAX_PLAINTEXT = 4096 - 86 - 16 - 1
_ELLIPSIS = "…"


def _document(msg: Message, body: str) -> dict[str, Any]:
    return {
        "title": msg.title,
        "body": body,
        "url": msg.url,
        # The page shows the same notification from a live tab with this tag, so a race never shows it twice.
        "tag": msg.notification_id,
        "topic": msg.topic,
        "count": msg.merged_count,
        "locale": msg.locale,
    }


def encode(msg: Message, limit: int = MAX_PLAINTEXT) -> bytes:
    """Serialize ``msg``; a body too long for ``limit`` bytes is cut on a character boundary with '…'.

    Text stays text: the service worker hands it to showNotification, which
    never interprets markup, and JSON escaping keeps it a string.
    """
    data = json.dumps(_document(msg, msg.body), ensure_ascii=False, separators=(",", ":")).encode()
    if len(data) <= limit:
        return data
    body = msg.body
    low, high = 0, len(body)
    # Binary search for the longest prefix that fits (escaping makes size non-linear in characters).
    while low < high:
        mid = (low + high + 1) // 2
        candidate = json.dumps(_document(msg, body[:mid] + _ELLIPSIS), ensure_ascii=False, separators=(",", ":"))
        if len(candidate.encode()) <= limit:
            low = mid
        else:
            high = mid - 1
    data = json.dumps(_document(msg, body[:low] + _ELLIPSIS), ensure_ascii=False, separators=(",", ":")).encode()
    if len(data) > limit:
        raise ValueError("the notification does not fit in a web push message even without its body")
    return data


def topic_header(msg: Message) -> str:
    """The RFC 8030 Topic (≤ 32 base64url characters), the same for every attempt of one notification.

    A push service keeps only the newest pending message of a Topic for an
    offline browser (RFC 8030 §5.4), so the Topic is derived from the
    notification's id and account only: a retry replaces its own earlier attempt, while two
    distinct notifications — merged ones too, each window being its own
    notification — never replace each other. Hashed, so the push service does
    not learn our ids.
    """
    key = f"{msg.account_id}\x00{msg.notification_id}"
    return base64.urlsafe_b64encode(hashlib.sha256(key.encode()).digest()).rstrip(b"=").decode()[:32]
