"""What a digest says: the weekly task list and the Friday workflow changes (EN/FR).

Pure functions from stored facts to one ``Message``; an empty list means
nothing to report, and then no email is sent.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import datetime

from belfry import i18n
from belfry.message import Item, Message

from services.batching.digest_store import TaskFact, WorkflowChange
from services.batching.merge import NAMESPACE, common_parent

_CHANGE_FR = {"enrolled": "inscrits", "unenrolled": "désinscrits", "completed": "terminés"}


def digest_id(account_id: str, user_id: str, digest: str, period: str) -> uuid.UUID:
    """One notification id per (user, digest, period): a retried digest is a duplicate the queue ignores."""
    return uuid.uuid5(NAMESPACE, f"digest/{account_id}/{user_id}/{digest}/{period}")


def _french(locale: str) -> bool:
    return i18n.language(locale) == "fr"


def tasks_message(
    tasks: Sequence[TaskFact], *, account_id: str, user_id: str, topic: str, period: str, at: datetime, locale: str
) -> Message | None:
    """The weekly task digest: open tasks, overdue ones flagged; None when there are none."""
    if not tasks:
        return None
    overdue = [t for t in tasks if t.due_at is not None and t.due_at < at]
    if _french(locale):
        title = f"Vos tâches : {len(tasks)} ouverte(s), dont {len(overdue)} en retard"
        lines = [f"{t.display_name}{' (en retard)' if t in overdue else ''}" for t in tasks]
    else:
        title = f"Your tasks: {len(tasks)} open, {len(overdue)} overdue"
        lines = [f"{t.display_name}{' (overdue)' if t in overdue else ''}" for t in tasks]
    return Message(
        notification_id=str(digest_id(account_id, user_id, "tasks", period)),
        account_id=account_id,
        user_id=user_id,
        topic=topic,
        title=title,
        body="\n".join(lines),
        url=common_parent([t.url for t in tasks], ""),
        occurred_at=at.isoformat(),
        bell=False,
        locale=locale,
        items=tuple(Item("task", t.task_id, t.display_name, t.url) for t in tasks),
        variables={
            "digest": "tasks",
            "period": period,
            "open": len(tasks),
            "overdue": len(overdue),
            "tasks": [
                {
                    "id": t.task_id,
                    "name": t.display_name,
                    "url": t.url,
                    "due_at": t.due_at.isoformat() if t.due_at else "",
                    "overdue": t in overdue,
                }
                for t in tasks
            ],
        },
    )


def workflows_message(
    changes: Sequence[WorkflowChange],
    *,
    account_id: str,
    user_id: str,
    topic: str,
    period: str,
    at: datetime,
    locale: str,
) -> Message | None:
    """The Friday digest: the week's enrolment changes per workflow; None when there were none."""
    if not changes:
        return None
    french = _french(locale)
    workflows: dict[str, tuple[str, str, Counter[str]]] = {}
    for c in changes:
        _, _, counts = workflows.setdefault(c.workflow_id, (c.workflow_name, c.url, Counter()))
        counts[c.change] += 1
    items: list[Item] = []
    for workflow_id, (name, url, counts) in workflows.items():
        parts = [f"{n} {_CHANGE_FR.get(k, k) if french else k}" for k, n in sorted(counts.items())]
        items.append(Item("workflow", workflow_id, f"{name}: {', '.join(parts)}", url))
    if french:
        title = f"{len(changes)} changement(s) d'inscription dans vos workflows cette semaine"
    else:
        title = f"{len(changes)} enrolment change(s) in your workflows this week"
    return Message(
        notification_id=str(digest_id(account_id, user_id, "workflows", period)),
        account_id=account_id,
        user_id=user_id,
        topic=topic,
        title=title,
        body="\n".join(i.display_name for i in items),
        url=common_parent([i.url for i in items], ""),
        occurred_at=at.isoformat(),
        bell=False,
        locale=locale,
        items=tuple(items),
        variables={"digest": "workflows", "period": period, "changes": len(changes)},
    )
