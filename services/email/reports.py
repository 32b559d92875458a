"""Reading bounce reports: RFC 3464 delivery status notifications and RFC 5965 (ARF) feedback reports.

Pure functions over the raw bytes (standard library ``email``, ``policy.default``): what each
report says happened to which recipient. Deciding what to suppress is ``services.email.bounces``'s.
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass
from email.message import Message

# Kinds of finding, as recorded in email.feedback.kind.
HARD = "hard bounce"  # failed, 5.x.x (not 5.7.x): the address will not work tomorrow either
SOFT = "soft bounce"  # delayed, or 4.x.x: it may work later
POLICY = "policy bounce"  # failed, 5.7.x: about the message or the sender, not the address
COMPLAINT = "complaint"  # an ARF report of Feedback-Type abuse

_STATUS = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})\b")
_MAX_DETAIL = 1000  # characters of a diagnostic kept (a remote server chooses its length)


@dataclass(frozen=True)
class Finding:
    """What one report says about one recipient."""

    kind: str
    addresses: tuple[str, ...]  # the recipient as the report names it (Final- and Original-Recipient), lower-cased
    status: str  # RFC 3463 status (e.g. 5.1.1), or the ARF Feedback-Type
    detail: str  # the Diagnostic-Code, or the ARF report's fields


def _text(value: object) -> str:
    """A header value on one line (folded values and control characters flattened), bounded."""
    return " ".join(str(value or "").split())[:_MAX_DETAIL]


def _address(field: object) -> str:
    """``rfc822; User@Example.com`` → ``user@example.com`` (RFC 3464 address-type; other types give "")."""
    kind, sep, value = _text(field).partition(";")
    if not sep:
        kind, value = "rfc822", kind
    if kind.strip().lower() != "rfc822":
        return ""
    return value.strip().strip("<>").strip().lower()


def _blocks(part: Message) -> list[Message]:
    """The header blocks of a ``message/delivery-status`` or ``message/feedback-report`` part.

    ``email`` parses delivery-status into one sub-message per block; any other ``message/*``
    type into a single sub-message whose headers are the report's fields.
    """
    payload = part.get_payload()
    if isinstance(payload, list):
        return [block for block in payload if isinstance(block, Message)]
    if isinstance(payload, str):
        parsed = email.message_from_string(payload, policy=email.policy.default)
        return [parsed]
    return []


def _delivery_status(report: Message) -> list[Finding]:
    found: list[Finding] = []
    for part in report.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        # The first block is about the message (Reporting-MTA, Arrival-Date); the others, one per recipient.
        for block in _blocks(part)[1:]:
            finding = _recipient_block(block)
            if finding is not None:
                found.append(finding)
    return found


def _recipient_block(block: Message) -> Finding | None:
    addresses = tuple(a for a in (_address(block["Final-Recipient"]), _address(block["Original-Recipient"])) if a)
    action = _text(block["Action"]).lower()
    status = _STATUS.match(_text(block["Status"]))
    if not addresses or status is None:
        return None
    code = ".".join(status.groups())
    detail = _text(block["Diagnostic-Code"]) or code
    if action == "failed" and code.startswith("5.7."):
        kind = POLICY
    elif action == "failed" and code.startswith("5."):
        kind = HARD
    elif action == "delayed" or (action == "failed" and code.startswith("4.")):
        kind = SOFT
    else:  # delivered, relayed, expanded: nothing went wrong
        return None
    return Finding(kind, addresses, code, detail)


def _feedback(report: Message) -> list[Finding]:
    for part in report.walk():
        if part.get_content_type() != "message/feedback-report":
            continue
        for fields in _blocks(part)[:1]:
            feedback_type = _text(fields["Feedback-Type"]).lower()
            if feedback_type != "abuse":
                # not-spam, auth-failure, fraud, virus, other: not the recipient asking to stop.
                return []
            # Original-Rcpt-To is optional (and often redacted): without it the VERP address's recipient stands.
            addresses = tuple(a for a in (_address(f) for f in fields.get_all("Original-Rcpt-To") or []) if a)
            detail = "; ".join(
                f"{name}: {_text(fields[name])}"
                for name in ("Feedback-Type", "User-Agent", "Source-IP")
                if fields[name]
            )
            return [Finding(COMPLAINT, addresses, feedback_type, detail)]
    return []


def read(raw: bytes) -> list[Finding] | None:
    """The findings of a report; None when ``raw`` is not a report this reads (the caller logs it).

    The ``email`` package's parser is lenient (defects are recorded, not raised) and every field is
    read through ``_text``; the receiver still treats an exception as "unreadable", never a crash.
    """
    message = email.message_from_bytes(raw, policy=email.policy.default)
    if message.get_content_type() != "multipart/report":
        return None
    report_type = str(message.get_param("report-type", "") or "").lower()
    if report_type == "delivery-status":
        return _delivery_status(message)
    if report_type == "feedback-report":
        return _feedback(message)
    return None
