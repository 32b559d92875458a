"""Request bodies: Slack-compatible for Slack incoming webhooks, a plain JSON document otherwise."""

from __future__ import annotations

import json
from typing import Any

from belfry.message import Message

SLACK_HOSTS = ("hooks.slack.com",)


def is_slack(host: str) -> bool:
    """Whether the endpoint is a Slack incoming webhook (its body is then Slack's message format)."""
    return host in SLACK_HOSTS


def _slack_escape(text: str) -> str:
    # Slack's mrkdwn treats &, < and > as control characters (links, mentions like <!channel>).
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack(msg: Message) -> dict[str, Any]:
    """``text`` (the fallback shown in notifications) and ``blocks``."""
    title, body = _slack_escape(msg.title), _slack_escape(msg.body)
    link = msg.url if msg.url.startswith(("https://", "http://")) and "|" not in msg.url and ">" not in msg.url else ""
    text = f"*{title}*\n{body}" + (f"\n<{link}|Open>" if link else "")
    blocks: list[dict[str, Any]] = [{"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}}]
    if msg.items:
        names = ", ".join(_slack_escape(i.display_name) for i in msg.items[:10])
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": names[:3000]}]})
    return {"text": f"{title}: {body}"[:3000], "blocks": blocks, "unfurl_links": False}


def generic(msg: Message, delivery_id: int) -> dict[str, Any]:
    """The plain document for any other endpoint."""
    return {
        "type": "notification",
        "delivery_id": delivery_id,
        "notification_id": msg.notification_id,
        "topic": msg.topic,
        "title": msg.title,
        "body": msg.body,
        "url": msg.url,
        "occurred_at": msg.occurred_at,
        "items": [{"type": i.type, "id": i.id, "name": i.display_name, "url": i.url} for i in msg.items],
    }


def encode(document: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON (what is signed is exactly what is sent)."""
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
